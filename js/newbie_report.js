// NewBie Memory Report on the canvas: after a run, the node shows the plans and measured peaks
// (the text its Python side returns as ui.text) in a read-only text box.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const NODE = "NewBieMemoryReport";
const WIDGET = "report";

function showReport(node, text) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, WIDGET, ["STRING", { multiline: true }], app).widget;
    widget.serialize = false;               // display only: never part of widgets_values
    if (widget.inputEl) {
      widget.inputEl.readOnly = true;
      widget.inputEl.style.fontFamily = "monospace";
      widget.inputEl.style.fontSize = "10px";
    }
  }
  widget.value = text;
  node.setSize([Math.max(node.size[0], 400), Math.max(node.size[1], 300)]);
  node.setDirtyCanvas(true, true);
}

app.registerExtension({
  name: "NewBie.MemoryReport",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (text) showReport(this, Array.isArray(text) ? text.join("\n") : String(text));
    };
  },
});
