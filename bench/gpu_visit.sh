#!/bin/bash
# One GPU visit's work, in parts that each get their own time limit and log under $OUT, so a part
# that runs long costs only itself and a visit cut short keeps what it measured. Run from the repo
# root on the GPU machine; afterwards bring the outputs home with bench/collect.py and render
# BENCHMARKS.md with bench/report.py.
#
#   bash bench/gpu_visit.sh tests soak lora          # the CUDA tier, the full-size soak, the LoRA cost
#   CUDA_TESTS="tests/test_gguf_cuda.py" RELIABILITY=0 bash bench/gpu_visit.sh tests   # some CUDA tier files, no reliability tier
#   bash bench/gpu_visit.sh rows gguf                # our rows (--final), then the GGUF rows
#   bash bench/gpu_visit.sh peers host-ram           # the peers (same visit as the rows), host RAM
#   PEERS=comfyui-full,diffusers-group-leaf bash bench/gpu_visit.sh gguf peers   # GGUF rows beside a few peers
#   HOST_RAM_LIMIT=330 bash bench/gpu_visit.sh host-ram   # a shorter limit for the host-RAM rows
#   bash bench/gpu_visit.sh host-ram-grid            # the whole RAM x VRAM x storage grid, adding to earlier rows
#   HOST_RAM_REDO="16:8:bf16 8:4:gguf-q4_k" bash bench/gpu_visit.sh host-ram   # re-run rows whose plan changed
#   ROW_SECTIONS=1024,512,fp8c ROWS_LIMIT=240 bash bench/gpu_visit.sh rows    # some of the row groups
#   bash bench/gpu_visit.sh throttle                 # the fits table's link projection, checked at 12/25 GB/s
#   bash bench/gpu_visit.sh decode                   # GGUF decode launch shapes against a copy
#   bash bench/gpu_visit.sh gaps                     # what streamed Q8_0 / fp8 steps wait for (profiler)
#   bash bench/gpu_visit.sh probe                    # fused-kernel and forward variants, idle gaps
#   bash bench/gpu_visit.sh act-memory               # what the 2 GB rows' peaks hold, per allocator setting
#   bash bench/gpu_visit.sh slots                    # streamed rows with at most 3 against at most 2 ring slots
#   bash bench/gpu_visit.sh cap                      # fp8 under 2 GB with and without the budget cap, allocator retries
#
# Wheels the machine lacks (diffusers, gguf, importlib_metadata, platformdirs) go in .whl/ (ignored by git).
# All parts share /tmp/full (the full-size random checkpoints) and one inductor cache, so only the
# first compile of a visit is cold.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl > /dev/null 2>&1 && [ ! -d /tmp/site ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 3
fi
export PYTHONPATH=/tmp/site TORCHINDUCTOR_CACHE_DIR=/tmp/ind PYTHONUNBUFFERED=1
T0=$(date +%s)
step() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
models() { [ -f /tmp/full/vae/ae.safetensors ] || timeout 60 python3 bench/full_size.py /tmp/full > "$OUT/full_size.log" 2>&1; }
ggufs() { models; [ -f /tmp/full/text_encoders/gemma-3-4b-it-Q4_K.gguf ] || \
    timeout 90 python3 bench/make_gguf.py /tmp/full --types Q8_0 Q4_K > "$OUT/make_gguf.log" 2>&1; }

for part in "$@"; do
    step "$part"
    case "$part" in
        tests)
            timeout 240 python3 -m pytest -q -m cuda -p no:cacheprovider --tb=short -s ${CUDA_TESTS:-tests/test_dit_fused.py \
                tests/test_cuda_pipeline.py tests/test_gguf_cuda.py tests/test_placement_cuda.py tests/test_fp8_compute.py tests/test_allocator.py} \
                > "$OUT/cuda_tier.log" 2>&1
            [ "${RELIABILITY:-1}" = 0 ] || timeout 120 python3 -m pytest -q -m cuda -p no:cacheprovider --tb=short -s \
                tests/reliability/test_cuda_reliability.py > "$OUT/reliability.log" 2>&1
            tail -n 1 "$OUT"/cuda_tier.log "$OUT"/reliability.log 2>/dev/null ;;
        soak)
            models; timeout 150 python3 bench/soak.py /tmp/full --runs 30 --steps 2 --out "$OUT/soak.json" > "$OUT/soak.log" 2>&1
            tail -n 1 "$OUT/soak.log" ;;
        lora)
            models; timeout 90 python3 bench/lora_bench.py --models /tmp/full --out "$OUT/lora.json" > "$OUT/lora.log" 2>&1
            tail -n 4 "$OUT/lora.log" ;;
        rows)
            models; timeout "${ROWS_LIMIT:-360}" python3 bench/run_benchmarks.py --models /tmp/full --out "$OUT/rb" --final \
                --sections "${ROW_SECTIONS:-first,1024,512,seed,fp8c,profiles,drift}" > "$OUT/final.log" 2>&1
            grep -E "ms/step|drift" "$OUT/final.log" | cut -c1-160 ;;
        gguf)
            ggufs; timeout 150 python3 bench/gguf_bench.py /tmp/full --out "$OUT/gguf.json" > "$OUT/gguf.log" 2>&1
            tail -n 2 "$OUT/gguf.log" | cut -c1-200 ;;
        peers)
            timeout "${PEERS_LIMIT:-320}" python3 bench/peers.py --out "$OUT/p" --passes 1024x2 --n-slow 2 --warmup 2 \
                --with-ours ${PEERS:+--peers "$PEERS"} \
                --timeout 100 > "$OUT/peers.log" 2>&1
            grep -E "cfg=" "$OUT/peers.log" | cut -c1-160 ;;
        host-ram)
            # rows already in bench/host_ram.json (an earlier visit) are kept, not run again
            ggufs; timeout "${HOST_RAM_LIMIT:-540}" python3 bench/host_ram_bench.py /tmp/full --targets --steps 4 \
                --resume bench/host_ram.json --redo ${HOST_RAM_REDO:-} --out "$OUT/host_ram.json" > "$OUT/host_ram.log" 2>&1
            tail -n 2 "$OUT/host_ram.log" | cut -c1-200 ;;
        host-ram-grid)
            # issue 13's whole grid, RAM 16/8/32 GB x VRAM 4/8 GB x every storage, cold and warm, most
            # common PC first; rows already in bench/host_ram.json are kept, so visits add to it
            ggufs; timeout "${HOST_RAM_LIMIT:-540}" python3 bench/host_ram_bench.py /tmp/full --steps 4 \
                --ram 16 8 32 --vram 4 8 --same-plan --resume bench/host_ram.json --redo ${HOST_RAM_REDO:-} \
                --out "$OUT/host_ram.json" > "$OUT/host_ram.log" 2>&1
            tail -n 2 "$OUT/host_ram.log" | cut -c1-200 ;;
        throttle)
            ggufs; timeout 240 python3 bench/link_throttle_bench.py /tmp/full --out "$OUT/throttle.json" \
                > "$OUT/throttle.log" 2>&1
            cut -c1-200 "$OUT/throttle.log" | tail -n 6 ;;
        probe)
            # kernel choices before the rows: fused-function variants, the block GEMMs, whole-forward
            # variants (with and without one CUDA graph) with their idle gaps and host-side time
            timeout 150 python3 bench/forward_bench.py --parts --part-list fused,gemm --out "$OUT/parts" \
                > "$OUT/parts.log" 2>&1
            grep -E "^fused|w1" "$OUT/parts.log" | cut -c1-220
            timeout 300 python3 bench/forward_bench.py --sizes 1024 --iters 10 --out "$OUT/fwd" \
                --host --variants "${PROBE_VARIANTS:-compiled,compiled-graph,compiled-fp8,compiled-graph-fp8}" \
                > "$OUT/forward.log" 2>&1
            grep -E "cfg=|gaps|host" "$OUT/forward.log" | cut -c1-400 ;;
        gaps)
            # where streamed GGUF and fp8 steps lose time against resident: compute-stream gaps put
            # down to copies, upcasts or the host, and upcasts beside compute (bench/stream_gaps.py)
            ggufs; timeout 150 python3 bench/stream_gaps.py /tmp/full --file NewBie-Image-Exp0.1-Q8_0.gguf \
                --budgets none,4,2 --trace-dir "$OUT/traces" --out "$OUT/gaps_q8_0.json" > "$OUT/gaps.log" 2>&1
            timeout 120 python3 bench/stream_gaps.py /tmp/full --file NewBie-Image-Exp0.1-bf16.safetensors \
                --storage fp8 --budgets none,2 --trace-dir "$OUT/traces" --out "$OUT/gaps_fp8.json" >> "$OUT/gaps.log" 2>&1
            cut -c1-300 "$OUT/gaps.log" | grep '^{' ;;
        decode)
            timeout 120 python3 bench/gguf_decode_bench.py > "$OUT/gguf_decode.log" 2>&1
            cat "$OUT/gguf_decode.log" | tail -n 12 ;;
        act-memory)
            # what the peaks hold and each allocator setting's peaks (bench/activation_memory.py):
            # rows storage:budget:size:file:allocators
            ggufs
            for spec in ${ACT_ROWS:-fp8:2:1024:bf16.safetensors:native,expandable,async \
                    bf16:2:1024:Q4_K.gguf:native,expandable,async bf16:none:1024:bf16.safetensors:native,expandable \
                    fp8:2:512:bf16.safetensors:native,expandable bf16:4:1024:bf16.safetensors:expandable}; do
                IFS=: read -r st b sz f al <<< "$spec"
                timeout 200 python3 bench/activation_memory.py /tmp/full --file "NewBie-Image-Exp0.1-$f" --storage "$st" \
                    $([ "$b" = none ] || echo "--budget $b") --size "$sz" --allocator ${al//,/ } \
                    --out "$OUT/act_${st}_${b}_${sz}_${f%%.*}.json" >> "$OUT/act.log" 2>&1
            done
            grep '^{' "$OUT/act.log" | cut -c1-330 ;;
        slots)
            ggufs; timeout "${SLOTS_LIMIT:-300}" python3 bench/ring_slots.py /tmp/full --out "$OUT/ring_slots.json" \
                > "$OUT/ring_slots.log" 2>&1
            grep '^{' "$OUT/ring_slots.log" | cut -c1-330 ;;
        cap)
            models; timeout "${CAP_LIMIT:-200}" python3 bench/cap_retries.py /tmp/full --out "$OUT/cap_retries.json" \
                > "$OUT/cap_retries.log" 2>&1
            cut -c1-300 "$OUT/cap_retries.log" | grep '^{' ;;
        *) echo "unknown part $part (tests soak lora rows gguf peers host-ram host-ram-grid throttle decode probe gaps act-memory slots cap)"; exit 2 ;;
    esac
done
step done
