import os
import subprocess
import sys


def test_tensorflow_imports_without_a_word_on_stderr():
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL",
                                                            "UCPJAX_DEBUG")}
    code = ("from ucpjax.quiet_tf import import_tensorflow; "
            "tf = import_tensorflow(); import sys; print(tf.constant(2).numpy()); "
            "print('after', file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True)
    assert out.stdout.strip() == "2"
    assert out.stderr == "after\n"  # stderr works again after the import
