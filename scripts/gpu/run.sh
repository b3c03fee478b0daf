#!/usr/bin/env bash
# One device run (see scripts/gpu/README.md): build llama-cpp-python 0.3.36 with CUDA (sm_90) from the
# trimmed sdist in .gpu/, then a CPU-vs-CUDA compaction check, the decode benchmark, and the runtime tests
# with every layer offloaded. Logs under $OUT (or ./gpu-out). Run from the repo root: bash scripts/gpu/run.sh
set -u
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
G=$PWD/.gpu
# A copy of the repo whose Model.load offloads every layer by default, so tests and benchmarks run on CUDA.
rm -rf /tmp/edgekv-repo && mkdir /tmp/edgekv-repo && cp -r edgekv tests scripts pyproject.toml /tmp/edgekv-repo/
sed -i 's/n_gpu_layers: int = 0,/n_gpu_layers: int = int(os.environ.get("EDGEKV_NGL", "0")),/' /tmp/edgekv-repo/edgekv/runtime/model.py
grep -q EDGEKV_NGL /tmp/edgekv-repo/edgekv/runtime/model.py || { echo "could not patch Model.load"; exit 1; }
cd "$G"
export OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 EDGEKV_HOME=/tmp/edgekv-home
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
which nvcc || export PATH=/usr/local/cuda/bin:$PATH; nvcc --version | tail -1
SITE=/tmp/edgekv-site; mkdir -p $SITE
python3 -m pip install -q --no-index --no-deps --no-compile --target $SITE whl/*.whl
if [ ! -f $SITE/llama_cpp/lib/libggml-cuda.so ]; then
  rm -rf src && mkdir src && tar xzf llama_cpp_python-0.3.36-trim.tar.gz -C src
  el "building llama-cpp-python (CUDA, sm_90)"
  CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL=16 timeout 420 python3 -m pip install --no-build-isolation --no-deps --no-index \
     --target $SITE src/llama_cpp_python-0.3.36 > "$OUT/build.log" 2>&1
  echo "build rc $?"; tail -5 "$OUT/build.log"
fi
el "built"
ls $SITE/llama_cpp/lib | tr '\n' ' '; echo
export PYTHONPATH=$SITE:/tmp/edgekv-repo
python3 -c "import llama_cpp; print('gpu offload supported:', llama_cpp.llama_supports_gpu_offload())"
cd /tmp/edgekv-repo
el "cuda compaction check"
timeout 120 python3 scripts/gpu/check.py 2>&1 | tee "$OUT/gpu_check.txt"
el "decode benchmark on CUDA"
EDGEKV_NGL=99 timeout 170 python3 scripts/bench_decode.py --contexts 8192,32768 --budgets 0.5,0.25,0.1 \
   --tokens 32 --threads 8 --prefill-tokens 4096 --out "$OUT/decode" 2>&1 | grep -v "^$" | tail -30
el "tests with -ngl 99"
LEFT=$(( 570 - ($(date +%s) - T0) )); echo "tests get ${LEFT}s"
EDGEKV_NGL=99 timeout $LEFT python3 -m pytest -q -x -p no:cacheprovider -m "not gemma" tests/test_runtime.py \
   tests/test_codec.py tests/test_tiny.py tests/test_cli.py 2>&1 | tail -25 | tee "$OUT/tests.txt"
el "done"
