#!/bin/bash
# Throwaway device script (not committed): install Ray + Serve, run bench.serve --preset gpu.
set -u
cat /root/keep/ray.part.* .whl-ray2/ray.part.* > /tmp/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/ray-*.whl .whl-deps/*.whl 2>&1 | tail -3
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
ray stop --force >/dev/null 2>&1
nvidia-smi -L; lscpu | grep "Model name"; nproc
date +%T
timeout 250 python3 -m bench.serve --preset gpu --seconds 3 --clients 1 8 > $OUT/serve_gpu.log 2>&1; echo "serve rc $?"
tail -45 $OUT/serve_gpu.log
cp bench/results/serve_gpu.* $OUT/ 2>/dev/null
ray stop --force >/dev/null 2>&1
date +%T
timeout 120 python3 devprobe_adam.py
