#!/usr/bin/env bash
# The GPU figures of docs/performance.md and docs/scale.md in one run (issues 15 and 25): about 10 minutes on one
# H100/H200.
#
#   bash benchmarks/gpu_figures.sh [output folder]        # default: perf_gpu/
#
# ViT-B/32 and ViT-B/16 at 224 px, bf16 autocast, MFU against 989 TFLOP/s (H100/H200 SXM dense bf16): vanilla FT beside
# CFFT with cached teacher CAMs and with the student's CAM; then the data pipeline per CPU worker with the refill on
# the GPU; then peak memory at ViT-L/14. Each command has its own time limit, so one slow part cannot take the others with it.
set -u
OUT="${1:-perf_gpu}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
CASES=ft,cfft_teacher_single,cfft_student_single,cam_pass
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
timeout 170 python benchmarks/training_throughput.py --size vit-b32 --bf16 --peak_tflops 989 --cases "$CASES" \
    --repeats 7 --output "$OUT/vit_b32.md" > "$OUT/vit_b32.log" 2>&1; echo "vit-b32 rc=$?"
timeout 190 python benchmarks/training_throughput.py --size vit-b16 --bf16 --peak_tflops 989 --cases "$CASES" \
    --repeats 7 --output "$OUT/vit_b16.md" > "$OUT/vit_b16.log" 2>&1; echo "vit-b16 rc=$?"
timeout 90 python benchmarks/image_pipeline.py --refill_device cuda --batch_size 256 --repeats 3 \
    --output "$OUT/pipeline.md" > "$OUT/pipeline.log" 2>&1; echo "pipeline rc=$?"
# Issue 25's memory targets where they matter: ViT-L/14 at batch 16, checkpointing on (docs/scale.md).
timeout 240 python benchmarks/memory.py --size vit-l14 --batch_size 16 --device cuda --bf16 \
    --gradient_checkpointing true --cases ft,cfft_bf16_teacher,lora_cfft \
    --output "$OUT/memory_vit_l14_b16.md" > "$OUT/memory.log" 2>&1; echo "memory rc=$?"
cat "$OUT"/*.md
