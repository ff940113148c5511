"""What `cmake --install build --prefix PREFIX` put there works on its own: the Python package
imports from PREFIX/lib/python3.X/dist-packages, and PREFIX/bin/pushbook-server --demo serves the
demo page from PREFIX/share/pushbook/web (not from the source tree)."""
import glob
import os
import re
import subprocess
import sys
import urllib.request

prefix = os.path.abspath(sys.argv[1])
site = glob.glob(os.path.join(prefix, "lib", "python3*", "dist-packages"))
assert len(site) == 1, f"no single python3.X/dist-packages under {prefix}/lib: {site}"
version = subprocess.check_output([sys.executable, "-c", "import pushbook; print(pushbook.__version__)"],
                                  env=dict(os.environ, PYTHONPATH=site[0]), cwd="/", text=True).strip()
assert re.fullmatch(r"\d+\.\d+\.\d+", version), version

server = os.path.join(prefix, "bin", "pushbook-server")
page = os.path.join(prefix, "share", "pushbook", "web", "index.html")
assert os.path.exists(page), page
proc = subprocess.Popen([server, "--demo", "--port", "0", "--store", "memory:"], stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True, cwd="/")
try:
    out = []
    for line in proc.stdout:
        out.append(line)
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+) ", line)
        if m:
            break
    else:
        raise AssertionError("the installed server did not start:\n" + "".join(out))
    for line in proc.stdout:
        out.append(line)
        if "demo page at" in line:
            break
    assert os.path.join(prefix, "share", "pushbook", "web") in "".join(out), "".join(out)
    with urllib.request.urlopen(f"http://127.0.0.1:{m.group(1)}/", timeout=10) as res:
        assert res.status == 200 and b"pushbook" in res.read()
finally:
    proc.terminate()
    proc.wait(10)
print(f"installed pushbook {version}: Python package in {site[0]}, server and demo page work")
