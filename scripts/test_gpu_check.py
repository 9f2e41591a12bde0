#!/usr/bin/env python3
"""
Tests of dev/gpu_check.sh (make gpu-check) where there is no GPU, in seconds: the check is run against
FAKE binaries (small C programs and shell scripts that print what the real ones print, or fail the way
real ones fail), a fake nvidia-smi and a fake torch environment, and each row of its table is asserted.

    python3 scripts/test_gpu_check.py          (make test runs it)

What it checks
- pack / unpack: the fake binaries packed by `dev/gpu_check.sh pack` (MANIFEST with bytes and sha256),
  unpacked by the check, verified against the MANIFEST ("binaries" row).
- the preflight: a binary linked against a library that no longer exists is named in the "libraries"
  row; a library found only in the torch environment's nvidia/*/lib folder joins LD_LIBRARY_PATH and
  the binary that needs it runs.
- the failure paths, each with the right row: a missing library ("cannot start: libX not found"), a
  hang ("timed out after N s"), a crash ("crashed: signal 11 (SIGSEGV)"), the loader's "error while
  loading shared libraries" message, cuDNN that did not execute ("cudnn: 0 graph executions"),
  compute-sanitizer refusing the device ("n/a: not available here"), a kernel that fails validation,
  GPU and CPU GRPO steps that differ.
- every part passing: the lines the check parses (the test summaries, "cudnn: N graph executions",
  "grpo subset (-g)", the trainer's step lines, peak memory, the GRPO step line); PARTS=fp32,2 runs only
  those; a bad PARTS is refused.
- the logs always come back: summary.txt and gpu_check.tgz (logs, no .bin files) in OUT after a normal
  end, after a failure and after the check is stopped by SIGTERM mid-part; the kernel lab's logs land in
  GPU_CHECK_LOG even when it is absolute (not in the repository).
- the dry run (GPU_CHECK_DRY=1) passes, with its CPU stand-in where ./train_moe exists.
- the travel-size rule (what gpu-check-build enforces): the archive (out/gpu_bin.tar.xz where it was
  built, else a stand-in packed from `make cuda-check`'s outputs) plus the tree is under 56 MiB; a
  stand-in that takes the total 1 MiB over the limit fails, 1 MiB under passes.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = os.path.join(ROOT, "dev", "gpu_check.sh")
failures = []


def check(cond, what):
    print(("  ok    " if cond else "  FAIL  ") + what)
    if not cond:
        failures.append(what)


def write(path, text, mode=0o644):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def script(path, body):
    write(path, "#!/bin/sh\n" + body, 0o755)


def cc(args, cwd):
    subprocess.run(["gcc", "-O0", "-w"] + args, cwd=cwd, check=True)


# a program that runs its behaviour, NAME.sh beside it, after calling into the library it is linked to
WRAP_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int moe_fake_lib(void);
int main(int argc, char** argv) {
    moe_fake_lib();
    char path[4096];
    snprintf(path, sizeof path, "%s.sh", argv[0]);
    char** args = calloc(argc + 2, sizeof(char*));
    args[0] = "sh"; args[1] = path;
    for (int i = 1; i < argc; i++) args[i + 1] = argv[i];
    execv("/bin/sh", args);
    perror("execv");
    return 1;
}
"""


def make_env(tmp):
    """fake nvidia-smi, torch environment, compute-sanitizers, reference and arith folders"""
    script(f"{tmp}/path/nvidia-smi", """
case "$*" in
  -L) echo "GPU 0: NVIDIA H100 80GB HBM3 (fake for scripts/test_gpu_check.py)" ;;
  *driver_version*--query*|*--query*) echo "NVIDIA H100 80GB HBM3 (fake), 9.0, 81559 MiB, 580.00.00" ;;
  *) echo "fake nvidia-smi" ;;
esac
""")
    torchlib = f"{tmp}/torch/lib/python3.12/site-packages/nvidia/cudnn/lib"
    os.makedirs(torchlib)
    write(f"{tmp}/c/fakelib.c", "int moe_fake_lib(void) { return 0; }\n")
    write(f"{tmp}/c/wrap.c", WRAP_C)
    cc(["-shared", "-fPIC", "-Wl,-soname,libmoe_fakecudnn.so.9", "fakelib.c", "-o", f"{torchlib}/libmoe_fakecudnn.so.9"], f"{tmp}/c")
    cc(["-shared", "-fPIC", "-Wl,-soname,libmoe_gone.so.1", "fakelib.c", "-o", "libmoe_gone.so.1"], f"{tmp}/c")
    cc(["wrap.c", f"{torchlib}/libmoe_fakecudnn.so.9", "-o", "wrap_torchlib"], f"{tmp}/c")
    cc(["wrap.c", "./libmoe_gone.so.1", "-o", "wrap_gone"], f"{tmp}/c")
    os.remove(f"{tmp}/c/libmoe_gone.so.1")  # gone: the binary cannot start
    script(f"{tmp}/sanitizer_refuses", 'echo "========= COMPUTE-SANITIZER"\necho "========= Error: Device not supported"\nexit 1\n')
    # the check's call: --tool memcheck --error-exitcode 1 --print-limit 20 PROGRAM ARGS...
    script(f"{tmp}/sanitizer_ok", 'shift 6\n"$@"\nrc=$?\necho "========= ERROR SUMMARY: 0 errors"\nexit $rc\n')
    write(f"{tmp}/ref/manifest.txt", "gqa mqa dense top1 moe deep\n")
    for f in ("arith_rl.bin", "arith_train_000.bin", "arith_val_000.bin", "arith_eval.bin"):
        write(f"{tmp}/arith/{f}", "fake\n")


# the trainers' lines the check parses
STEP = "step {n:5d}/8 | loss 9.1 (ce 9.0 aux 0.01 z 0.001) | lr 1.00e-03 | norm 1.0 | 250.0 ms | 32768 tok/s | MFU 41.5% | mem 23000 MiB"
RL_CPU = "rl step    1/1 | reward 0.250 solved 0.500 flat 0.500 | loss 0.01234 kl 0.00000 clip 0.0000 | len 9.5 entropy 3.210 | lr 5.00e-06 norm 0.1234 | rollout 10 ms update 5 ms | 100 tok/s"


def trainer_body(cudnn_execs, rl_line=RL_CPU, ckpt_name="model_00000010.bin"):
    """a fake trainer: -o DIR gets a fixed checkpoint, -rl prints a GRPO step, else 8 step lines"""
    steps = "\n".join("echo '" + STEP.format(n=i) + "'" for i in range(1, 9))
    return f"""
out=""; rl=0
while [ $# -gt 0 ]; do case $1 in -o) out=$2; shift ;; -rl) rl=1 ;; esac; shift; done
if [ $rl = 1 ]; then echo '{rl_line}'; exit 0; fi
{steps}
echo "peak gpu memory 23456 MiB"
{"echo 'cudnn: %d graph executions'" % cudnn_execs if cudnn_execs is not None else ""}
if [ -n "$out" ]; then mkdir -p "$out"; printf 'weights' > "$out/{ckpt_name}"; fi
exit 0
"""


def lab_kernels():
    return sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "dev", "cuda")) if f.endswith(".cu"))


def make_bin(tmp, name, files):
    """files: name -> ('script', body) | ('wrap', kind, body); packed with gpu_check.sh pack"""
    d = f"{tmp}/{name}_src"
    for fname, spec in files.items():
        path = f"{d}/{fname}"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if spec[0] == "script":
            script(path, spec[1])
        else:
            shutil.copy(f"{tmp}/c/{spec[1]}", path)
            write(path + ".sh", spec[2])
    write(f"{d}/BUILD_INFO", "fake binaries of scripts/test_gpu_check.py\n")
    archive = f"{tmp}/{name}.tar.xz"
    r = subprocess.run(["bash", CHECK, "pack", d, archive], capture_output=True, text=True)
    check(r.returncode == 0 and os.path.exists(archive) and os.path.exists(f"{d}/MANIFEST"),
          f"pack {name}: {r.stdout.strip()[:120]}")
    shutil.rmtree(d)  # the check must unpack it
    return archive


def run_check(tmp, tag, archive, parts="all", extra=None, wait=True, part_max="3"):
    out, log = f"{tmp}/{tag}/out", f"{tmp}/{tag}/log"  # an absolute GPU_CHECK_LOG
    env = dict(os.environ)
    env.update({"PATH": f"{tmp}/path:" + env["PATH"], "GPU_BIN": f"{tmp}/{tag}/bin", "GPU_BIN_ARCHIVE": archive,
                "OUT": out, "GPU_CHECK_LOG": log, "PARTS": parts, "GPU_CHECK_REBUILD": "0",
                "GPU_CHECK_REF": f"{tmp}/ref", "GPU_CHECK_ARITH": f"{tmp}/arith", "GPU_CHECK_TORCH_ENV": f"{tmp}/torch",
                "GPU_CHECK_PART_MAX": part_max, "GPU_CHECK_KILL_AFTER": "1", "GPU_CHECK_SANITIZER": f"{tmp}/sanitizer_ok"})
    env.pop("LD_LIBRARY_PATH", None)
    env.pop("GPU_CHECK_DRY", None)
    env.update(extra or {})
    p = subprocess.Popen(["bash", CHECK], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    if not wait:
        return p, out, log
    text = p.communicate(timeout=120)[0]
    return p.returncode, text, out, log


def rows(out):
    """the table of OUT/summary.txt: row name -> (status, key figure)"""
    table = {}
    with open(f"{out}/summary.txt") as f:  # columns: part (28) status (8) seconds (7), key figure
        for line in f:
            line = line.rstrip("\n")
            status = line[29:37].strip()
            if len(line) > 47 and status in ("ok", "FAIL", "n/a", "not run"):
                table[line[:28].strip()] = (status, line[47:])
    return table


def expect(table, name, status, *pieces):
    st, fig = table.get(name, ("missing", ""))
    good = st == status and all(re.search(p, fig, re.I) for p in pieces)
    check(good, f"row '{name}': {status} {' '.join(pieces)}" + ("" if good else f"  [got: {st} | {fig}]"))


def tgz_members(out):
    try:
        with tarfile.open(f"{out}/gpu_check.tgz") as t:
            return t.getnames()
    except (OSError, tarfile.TarError):
        return []


def test_failures(tmp):
    print("failure paths: a missing library, a hang, a crash, the loader's message, cuDNN unused, ...")
    lab = {f"lab/{k}": ("script", f"echo 'RESULT kernel={k} version=1 case=c ok=1 ms=0.1 gbps=1 tflops=- pct_peak=1 peak=hbm'\n")
           for k in lab_kernels()}
    lab["lab/adamw"] = ("script", "echo 'RESULT kernel=adamw version=2 case=c ok=0 ms=- gbps=- tflops=- pct_peak=- peak=hbm'\nexit 1\n")
    archive = make_bin(tmp, "fail", {
        "test_moe_cu_fp32": ("wrap", "wrap_gone", "echo never\n"),
        "test_moe_cu": ("script", "echo 'a test that hangs'\nexec sleep 60\n"),
        "test_moe_cu_cudnn": ("script", "echo 'a test that crashes'\nkill -SEGV $$\n"),
        "train_moe_cu": ("script", "echo \"$0: error while loading shared libraries: libcudnn.so.9: cannot open shared object "
                                   "file: No such file or directory\" >&2\nexit 127\n"),
        "train_moe_cu_cudnn": ("wrap", "wrap_torchlib", trainer_body(0)),
        "train_moe": ("script", trainer_body(None, ckpt_name="model_00000001.bin")),
        "train_moe_cu_fp32": ("script", trainer_body(None, RL_CPU.replace("len 9.5", "len 11.0"))),
        **lab,
    })
    t0 = time.time()
    rc, text, out, log = run_check(tmp, "fail", archive, extra={"GPU_CHECK_SANITIZER": f"{tmp}/sanitizer_refuses"})
    t = rows(out)
    check(rc == 1, f"exit status 1 when a part fails (got {rc}, {time.time() - t0:.1f} s)")
    expect(t, "binaries", "ok", r"unpacked from fail\.tar\.xz", r"files as in MANIFEST")
    expect(t, "libraries", "FAIL", r"missing: libmoe_gone\.so\.1 \(test_moe_cu_fp32\)", r"LD_LIBRARY_PATH \+= \S*nvidia/cudnn/lib")
    expect(t, "1 test fp32", "FAIL", r"cannot start: libmoe_gone\.so\.1 not found \(exit 127\)")
    expect(t, "2 test bf16", "FAIL", r"^timed out after 3 s")
    expect(t, "3 test cuDNN (quick)", "FAIL", r"^crashed: signal 11 \(SIGSEGV\)")
    expect(t, "4 determinism", "FAIL", r"train_moe_cu run a: cannot start: libcudnn\.so\.9 not found")
    expect(t, "5 d1024-E8-k2 T=4096", "FAIL", r"MFU 41\.5%", r"peak 23456 MiB", r"cuDNN did not execute \(0 ")
    expect(t, "6 grpo update vs CPU", "not run", r"no -g")
    expect(t, "6 grpo step CPU vs GPU", "FAIL", r"^len 9\.5 \(CPU\) vs 11\.0 \(GPU\)")
    expect(t, "7 memcheck (quick)", "n/a", r"not available here: .*Device not supported")
    expect(t, "8 kernel lab", "FAIL", r"1 of 12 files failed", r"12 results, 1 failed validation")
    expect(t, "9 data parallel R=1", "not run", r"no MPI build")
    names = tgz_members(out)
    check(any(n.endswith("/test_moe_cu.log") for n in names) and any(n.endswith("/kernel_lab/adamw.log") for n in names)
          and any(n.endswith("/summary.txt") for n in names) and any(n.endswith("/console.txt") for n in names),
          f"gpu_check.tgz holds the parts' logs, the kernel lab's, the table and the console ({len(names)} entries)")
    check(not any(n.endswith(".bin") for n in names), "gpu_check.tgz holds no .bin (no checkpoints)")
    check(os.path.exists(f"{log}/kernel_lab/adamw.log") and not os.path.exists(os.path.join(ROOT, log.lstrip("/"))),
          "the kernel lab's logs are in the absolute GPU_CHECK_LOG, nothing under the repository")
    check(sorted(os.listdir(out)) == ["gpu_check.tgz", "summary.txt"], f"OUT holds gpu_check.tgz and summary.txt: {sorted(os.listdir(out))}")


def pass_files(tmp):
    lab = {f"lab/{k}": ("script", f"echo 'RESULT kernel={k} version=1 case=c ok=1 ms=0.1 gbps=1 tflops=- pct_peak=1 peak=hbm'\n")
           for k in lab_kernels()}
    test = ("case $1 in\n"
            "  -q) echo 'quick subset (-q): 9 passed, 0 failed'; {extra} ;;\n"
            "  -g) echo '[gqa grpo] update 1/2 on the GPU vs the CPU: ratios of mini-batch 1: max|r-1| 0'; "
            "echo 'grpo subset (-g): 8 passed, 0 failed' ;;\n"
            "  *) echo '[gqa grpo] update 1/2 on the GPU vs the CPU: loss 0.1 vs 0.1'; echo '30 passed, 0 failed' ;;\n"
            "esac\n")
    return {
        "test_moe_cu_fp32": ("script", test.format(extra="true")),
        "test_moe_cu": ("script", "# has the GRPO subset: grpo subset (-g)\n" + test.format(extra="true")),
        "test_moe_cu_cudnn": ("wrap", "wrap_torchlib", test.format(extra="echo 'cudnn: 24 graph executions'")),
        "train_moe_cu": ("script", trainer_body(None)),
        "train_moe_cu_cudnn": ("wrap", "wrap_torchlib", trainer_body(12)),
        "train_moe": ("script", trainer_body(None, ckpt_name="model_00000001.bin")),
        "train_moe_cu_fp32": ("script", trainer_body(None, RL_CPU.replace("loss 0.01234", "loss 0.01235"))),
        **lab,
    }


def test_passes(tmp):
    print("every part passing, PARTS, the dry run")
    archive = make_bin(tmp, "pass", pass_files(tmp))
    rc, text, out, log = run_check(tmp, "pass", archive)
    t = rows(out)
    check(rc == 0, f"exit status 0 when nothing fails (got {rc})")
    expect(t, "libraries", "ok", r"resolve every library", r"LD_LIBRARY_PATH \+= \S*nvidia/cudnn/lib")
    expect(t, "reference states", "ok", r"6 configurations")
    expect(t, "1 test fp32", "ok", r"^30 passed, 0 failed")
    expect(t, "2 test bf16", "ok", r"^30 passed, 0 failed")
    expect(t, "3 test cuDNN (quick)", "ok", r"9 passed, 0 failed; cuDNN: 24 graph executions")
    expect(t, "4 determinism", "ok", r"identical checkpoints after 10 steps: bf16 cuDNN \(12 graph executions\)")
    expect(t, "5 d1024-E8-k2 T=4096", "ok", r"^MFU 41\.5%, 32768 tok/s \(medians of steps 3-8\), peak 23456 MiB", r"cuDNN: 12 graph")
    expect(t, "6 grpo update vs CPU", "ok", r"test_moe_cu -g: 8 passed, 0 failed")
    expect(t, "6 grpo step CPU vs GPU", "ok", r"reward 0\.250 len 9\.5 .*as the CPU step")
    expect(t, "7 memcheck (quick)", "ok", r"ERROR SUMMARY: 0 errors; test 9 passed, 0 failed")
    expect(t, "8 kernel lab", "ok", r"12 files, 12 results, 0 failed validation")
    check(open(f"{out}/summary.txt").read().rstrip().endswith("nothing failed"), "the table ends 'nothing failed'")

    rc, text, out, log = run_check(tmp, "parts", archive, parts="fp32,2")
    t = rows(out)
    check(rc == 0 and set(k for k in t if k[0].isdigit()) == {"1 test fp32", "2 test bf16"},
          f"PARTS=fp32,2 runs parts 1 and 2 alone: {sorted(k for k in t if k[0].isdigit())}")
    rc, text, out, log = run_check(tmp, "badparts", archive, parts="fp32,bench")
    check(rc == 2 and "no part 'bench'" in text, f"PARTS=fp32,bench is refused (exit {rc})")

    # the real data/arith where it was built (the GRPO stand-in runs on it), else none (not run)
    arith = os.path.join(ROOT, "data", "arith") if os.path.exists(os.path.join(ROOT, "data", "arith", "arith_rl.bin")) else f"{tmp}/none"
    dry = {"GPU_CHECK_DRY": "1", "GPU_CHECK_ARITH": arith}
    files = pass_files(tmp)
    cpu = os.path.join(ROOT, "train_moe")
    if os.access(cpu, os.X_OK):  # the real CPU trainer: the dry run's determinism stand-in
        shutil.copy(cpu, f"{tmp}/train_moe_real")
        files["train_moe"] = ("script", f'exec "{tmp}/train_moe_real" "$@"\n')
    archive = make_bin(tmp, "dry", files)
    rc, text, out, log = run_check(tmp, "dry", archive, extra=dry, part_max="60")
    t = rows(out)
    check(rc == 0, f"the dry run passes (exit {rc})")
    expect(t, "1 test fp32", "not run", r"^dry run$")
    expect(t, "5 d1024-E8-k2 T=4096", "not run", r"^dry run$")
    if os.access(cpu, os.X_OK):
        expect(t, "4 determinism, CPU stand-in", "ok", r"identical checkpoints")
    else:
        print("  (no ./train_moe: the dry run's CPU stand-in was not checked)")


def test_stopped(tmp):
    print("stopped mid-part by SIGTERM: the table and the logs still come back")
    files = pass_files(tmp)
    files["test_moe_cu"] = ("script", "echo 'a test that hangs'\nexec sleep 60\n")
    archive = make_bin(tmp, "stop", files)
    p, out, log = run_check(tmp, "stop", archive, wait=False, part_max="30")
    deadline = time.time() + 30
    while time.time() < deadline:  # part 1 done, part 2 hanging
        if os.path.exists(f"{out}/summary.txt") and "1 test fp32" in open(f"{out}/summary.txt").read():
            break
        time.sleep(0.1)
    time.sleep(0.5)
    os.killpg(p.pid, signal.SIGTERM)
    p.communicate(timeout=30)
    t = rows(out)
    expect(t, "1 test fp32", "ok", r"30 passed")
    check("interrupted by a signal" in open(f"{out}/summary.txt").read(), "the table says the check was interrupted")
    names = tgz_members(out)
    check(any(n.endswith("/test_moe_cu_fp32.log") for n in names) and any(n.endswith("/test_moe_cu.log") for n in names),
          "gpu_check.tgz holds part 1's log and the stopped part's")


def test_travel_size(tmp):
    print("the travel-size rule (gpu-check-build): the tree + the archive, at most 56 MiB")
    r = subprocess.run(["bash", CHECK, "travel-size"], cwd=ROOT, capture_output=True, text=True)
    m = re.search(r"the tree git sees ([0-9.]+) MiB", r.stdout)
    if not m:
        print(f"  (not a git checkout: skipped: {r.stdout.strip()})")
        return
    tree = float(m.group(1))
    real = os.path.join(ROOT, "out", "gpu_bin.tar.xz")
    if os.path.exists(real):
        standin, what = real, "out/gpu_bin.tar.xz"
    else:  # the binaries make cuda-check built (no -lineinfo), packed like gpu-check-build packs out/gpu_bin
        dirs = [os.path.join(os.environ.get("TMPDIR") or "/tmp", "moe-cuda-check"), os.path.join(ROOT, "dev", "cuda", ".compile-check")]
        found = [os.path.join(d, f) for d in dirs if os.path.isdir(d) for f in sorted(os.listdir(d))]
        standin, what = None, "no binaries of make cuda-check to pack"
        if found:
            standin = f"{tmp}/standin.tar.xz"
            subprocess.run(f"tar -cf - {' '.join(found)} 2>/dev/null | xz -T0 -1 > {standin}", shell=True, check=True)
            what = f"a stand-in: {len(found)} binaries of make cuda-check, tar.xz -1"
    if standin:
        r = subprocess.run(["bash", CHECK, "travel-size", standin], cwd=ROOT, capture_output=True, text=True)
        check(r.returncode == 0 and "under the 56 MiB" in r.stdout, f"{what}: {r.stdout.strip()}")
    else:
        print(f"  ({what}: only the limit itself is checked)")
    limit = int(tree) + 10  # the rule itself, whatever the tree holds now: 1 MiB over the limit fails, under passes
    for delta, ok in ((1.0, False), (-1.0, True)):
        size = int((limit - tree + delta) * 1048576)
        path = f"{tmp}/standin_{'over' if not ok else 'under'}.bin"
        with open(path, "wb") as f:
            f.truncate(size)
        r = subprocess.run(["bash", CHECK, "travel-size", path], cwd=ROOT, capture_output=True, text=True,
                           env=dict(os.environ, GPU_CHECK_MAX_MIB=str(limit)))
        check((r.returncode == 0) == ok and ("FAILED" in r.stdout) != ok,
              f"tree + {size / 1048576:.1f} MiB {'passes' if ok else 'fails'} (exit {r.returncode}): {r.stdout.strip()[:150]}")


def timed_section(f, tmp):
    t0 = time.time()
    f(tmp)
    print(f"  ({time.time() - t0:.1f} s)")


def main():
    for tool in ("gcc", "ldd", "xz", "timeout"):
        if not shutil.which(tool):
            print(f"test_gpu_check: SKIP: no {tool}")
            return 0
    t0 = time.time()
    tmp = tempfile.mkdtemp(prefix="test_gpu_check_")
    try:
        make_env(tmp)
        for f in (test_failures, test_passes, test_stopped, test_travel_size):
            timed_section(f, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        print(f"test_gpu_check: {len(failures)} FAILED ({time.time() - t0:.0f} s)")
        return 1
    print(f"test_gpu_check: every check passed ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
