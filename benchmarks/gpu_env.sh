# Sourced by the benchmarks/gpu_*.sh scripts on a lent GPU machine: what the GPU image lacks, from .gpu/
# (git-ignored; see gpu_robust.sh), then $PY / $AF and the card's line for the log. With PY set (a CPU dry run
# with this machine's venv) the .gpu wheels, built for the GPU image's Python 3.12, are left alone.
if [ -z "${PY:-}" ] && [ -d .gpu ] && ls .gpu/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .gpu/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
if [ -f .gpu/flite.tar.xz ] && [ -w /usr/lib/x86_64-linux-gnu ]; then
  tar xJf .gpu/flite.tar.xz -C /usr/lib/x86_64-linux-gnu && ldconfig
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
PY=${PY:-python3}
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"
AF="$PY -m avatarforcing.cli"

# synth_corpus DIR SPLIT CLIPS SEED SECONDS: espeak-ng + flite voices, espeak-ng alone if libflite does not load
synth_corpus() {
  $AF data synth --out $1 --clips $3 --seconds $5 --split $2 --seed $4 --voices espeak,flite --workers 16 \
      --shards-only 2>&1 | tail -1 && return 0
  echo "flite voices failed: espeak-ng only"; rm -rf $1/shards/$2-*
  $AF data synth --out $1 --clips $3 --seconds $5 --split $2 --seed $4 --workers 16 --shards-only 2>&1 | tail -1
}
