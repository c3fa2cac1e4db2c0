#!/usr/bin/env bash
# Create the separate TensorFlow baseline environment <repo>/.venv-tf (Python 3.11).
#
#   bash scripts/bench_baselines/setup_tf_env.sh
#
# Why separate: tfmot needs full `tensorflow` + `tf-keras`, while the project's .venv has
# `tensorflow-cpu`; the two TensorFlow wheels install into the same package folder, so they
# must not share an environment. This script never touches .venv.
# Idempotent: a stamp file makes a second run a no-op. If requirements-tf.lock exists it is installed exactly (--no-deps on top of the
# pins resolved together); otherwise the top-level pins are resolved and the lock is written.
# Environment: PYTHON (default python3.11), VENV_TF (default <repo>/.venv-tf).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${VENV_TF:-$root/.venv-tf}"
python="${PYTHON:-python3.11}"
lock="$here/requirements-tf.lock"
stamp="$venv/.ucpjax-tf-stamp"

# The pins of the baseline (see ../shared/TOOLCHAIN.md, "Baselines").
pins=(
  tensorflow==2.21.0
  tf-keras==2.21.0
  tensorflow-model-optimization==0.8.1
  ai-edge-litert==2.3.0
)

# The stamp holds a hash of this script and the lock: editing either re-runs the install.
digest() { cat "${BASH_SOURCE[0]}" "$lock" 2>/dev/null | sha256sum | cut -d' ' -f1; }
want="$(set +o pipefail; digest)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "setup_tf_env: $venv is up to date (delete $stamp to force)"
  exit 0
fi

if [[ "$venv" -ef "$root/.venv" ]]; then
  echo "setup_tf_env: refusing to install into the project's .venv" >&2
  exit 1
fi

"$python" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
  || { echo "setup_tf_env: need Python 3.11 (set PYTHON=...)" >&2; exit 1; }

[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

if [[ -f "$lock" ]]; then
  "${pip[@]}" install --no-deps -r "$lock"
else
  "${pip[@]}" install "${pins[@]}"
  "${pip[@]}" freeze --all --exclude-editable | grep -v -E '^(pip|setuptools)==' > "$lock"
  echo "setup_tf_env: wrote $lock"
  want="$(digest)"
fi
"${pip[@]}" check

TF_USE_LEGACY_KERAS=1 TF_CPP_MIN_LOG_LEVEL=2 "$venv/bin/python" - <<'PY'
import tensorflow as tf, tf_keras, tensorflow_model_optimization as tfmot, ai_edge_litert
print("setup_tf_env: tf", tf.__version__, "| tf_keras", tf_keras.__version__,
      "| tfmot", tfmot.__version__)
PY

echo "$want" > "$stamp"
echo "setup_tf_env: ready at $venv"
