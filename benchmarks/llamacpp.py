"""llama.cpp as a benchmark baseline (a tool only, never a dependency of jaxdecode).

Finds ``llama-bench``, ``llama-quantize`` and ``llama-perplexity`` in ``--llama-cpp DIR`` or
``$LLAMA_CPP_BIN``, makes the F32 / BF16 / Q8_0 files of the default model's weights with
``llama-quantize --allow-requantize`` (next to a copy of the shipped Q4_1 file, in
``--llama-models DIR`` or ``$LLAMA_CPP_MODELS``, default ``~/.cache/jaxdecode-bench/llamacpp``),
and runs the binaries with their default settings: threads = llama.cpp's default (the number of
physical cores), its default batch sizes, flash attention ``auto``, mmap on.

``llama-bench`` is one-shot: each call here is one invocation with ``-r 1`` (one timed
repetition after llama-bench's own warm-up run) so that the suite can interleave it with the
long-lived jaxdecode / transformers workers. Its peak RSS comes from ``os.wait4``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile

FORMATS = ("F32", "BF16", "Q8_0", "Q4_1")
BINARIES = ("llama-bench", "llama-quantize", "llama-perplexity")
DEFAULT_MODELS = os.path.join(os.path.expanduser("~"), ".cache", "jaxdecode-bench", "llamacpp")


class LlamaCpp:
    """The llama.cpp binaries in ``bin_dir`` and the model files in ``models_dir``."""

    def __init__(self, bin_dir: str, models_dir: str):
        self.bin_dir = bin_dir
        self.models_dir = models_dir
        self.repack = True  # llama.cpp's default; see check_repack

    @classmethod
    def find(cls, bin_dir: str | None, models_dir: str | None) -> tuple["LlamaCpp | None", str]:
        """``(LlamaCpp, "")`` when the binaries are there, else ``(None, why)``."""
        bin_dir = bin_dir or os.environ.get("LLAMA_CPP_BIN")
        if not bin_dir:
            return None, "llama.cpp not configured (pass --llama-cpp DIR or set LLAMA_CPP_BIN)"
        missing = [b for b in BINARIES if not os.access(os.path.join(bin_dir, b), os.X_OK)]
        if missing:
            return None, f"llama.cpp binaries missing in {bin_dir}: {', '.join(missing)}"
        return cls(bin_dir, models_dir or os.environ.get("LLAMA_CPP_MODELS") or DEFAULT_MODELS), ""

    def exe(self, name: str) -> str:
        return os.path.join(self.bin_dir, name)

    def model_file(self, fmt: str) -> str:
        return os.path.join(self.models_dir, f"SmolLM2-135M-Instruct.{fmt}.gguf")

    def prepare(self, source_gguf: str, formats=FORMATS) -> dict:
        """Makes the missing model files (copy of the source for its own format, requantized for
        the others); returns ``{format: path}``."""
        os.makedirs(self.models_dir, exist_ok=True)
        src_fmt = os.path.basename(source_gguf).rsplit(".", 2)[-2]
        out = {}
        for fmt in formats:
            path = self.model_file(fmt)
            if not os.path.exists(path):
                if fmt == src_fmt:
                    shutil.copyfile(source_gguf, path)
                else:
                    subprocess.run([self.exe("llama-quantize"), "--allow-requantize", source_gguf, path, fmt],
                                   check=True, capture_output=True, text=True)
            out[fmt] = path
        return out

    def check_repack(self, fmt: str = "Q8_0") -> str:
        """Checks that llama.cpp's default weight repacking works on this machine with a short
        prompt run. On a CPU that reports AMX but whose kernel / VM does not enable the AMX tile
        state, the repacked (AMX) path dies (SIGILL / SIGSEGV in libggml-cpu); then all runs use
        ``--repack 0`` (llama-bench) / ``--no-repack`` (llama-perplexity), llama.cpp's own
        AVX-512 / AVX2 kernels. Returns a note ("" when the default works)."""
        try:
            self.bench(fmt, n_prompt=32, extra=["--no-warmup"])
            return ""
        except ToolFailed as e:
            if e.returncode >= 0:
                raise
            self.repack = False
            self.bench(fmt, n_prompt=32, extra=["--no-warmup"])  # must work now
            return (f"llama.cpp's default weight repacking (AMX) crashes on this machine (llama-bench "
                    f"{fmt} -p 32 died with signal {-e.returncode}): every llama.cpp run uses --repack 0 / "
                    "--no-repack (its AVX-512/AVX2 kernels)")

    def bench(self, fmt: str, *, n_prompt: int = 0, n_gen: int = 0, timeout: float = 600,
              extra: list = ()) -> dict:
        """One ``llama-bench -m FILE -p n_prompt -n n_gen -r 1 -o json`` invocation: its
        tokens/s (``avg_ts``), seconds, threads and the process's peak RSS (MiB)."""
        cmd = [self.exe("llama-bench"), "-m", self.model_file(fmt), "-p", str(n_prompt), "-n", str(n_gen),
               "-r", "1", "-o", "json", *([] if self.repack else ["--repack", "0"]), *extra]
        stdout, rss_mb = _run_with_rss(cmd, timeout)
        (row,) = json.loads(stdout)
        return {"tokens_per_s": float(row["avg_ts"]), "seconds": float(row["avg_ns"]) / 1e9,
                "threads": row.get("n_threads"), "peak_rss_mb": rss_mb, "model_size": row.get("model_size"),
                "model_type": row.get("model_type"), "flash_attn": row.get("flash_attn"),
                "n_batch": row.get("n_batch"), "n_ubatch": row.get("n_ubatch")}

    def perplexity(self, fmt: str, text_file: str, *, n_ctx: int = 512, chunks: int | None = None,
                   timeout: float = 1200) -> dict:
        """``llama-perplexity -m FILE -f TEXT -c n_ctx [--chunks N]``: the final PPL estimate and
        its +/- (parsed from the tool's log)."""
        cmd = [self.exe("llama-perplexity"), "-m", self.model_file(fmt), "-f", text_file, "-c", str(n_ctx)]
        if chunks:
            cmd += ["--chunks", str(chunks)]
        if not self.repack:
            cmd.append("--no-repack")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        text = proc.stdout + proc.stderr
        m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", text)
        if proc.returncode != 0 or not m:
            raise RuntimeError(f"llama-perplexity failed ({proc.returncode}): {text.strip()[-400:]}")
        chunks_seen = re.search(r"calculating perplexity over (\d+) chunks", text)
        return {"ppl": float(m.group(1)), "ppl_err": float(m.group(2)), "command": " ".join(cmd),
                "chunks": int(chunks_seen.group(1)) if chunks_seen else None}


class ToolFailed(RuntimeError):
    """A llama.cpp binary exited with an error (``returncode`` < 0: killed by that signal)."""

    def __init__(self, cmd: list, returncode: int, stderr: str):
        super().__init__(f"{os.path.basename(cmd[0])} failed ({returncode}): {stderr.strip()[-300:]}")
        self.returncode = returncode


def _run_with_rss(cmd: list, timeout: float) -> tuple[str, float]:
    """Runs ``cmd``; returns its stdout and the child's peak RSS in MiB (``os.wait4``)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        try:
            _, status, usage = _wait4(proc.pid, timeout)
        except TimeoutError:
            proc.kill()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise ToolFailed(cmd, proc.returncode, err.read())
        return out.read(), usage.ru_maxrss / 1024.0


def _wait4(pid: int, timeout: float):
    """``os.wait4`` with a timeout (polls)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        got, status, usage = os.wait4(pid, os.WNOHANG)
        if got:
            return got, status, usage
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} still running after {timeout} s")
        time.sleep(0.01)
