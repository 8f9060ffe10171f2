"""Where a benchmark ran: the CPU's name and the SIMD flags that matter to
the kernels, for the line every benchmark prints before its figures."""
import os

FLAGS = ("avx2", "fma", "f16c", "avx_vnni")


def cpu():
    """(model name, the relevant SIMD flags) from /proc/cpuinfo."""
    name, flags = "?", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name == "?":
                    name = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    flags = [x for x in line.split(":", 1)[1].split() if x in FLAGS or x.startswith("avx512")]
    except OSError:
        pass
    return name, flags


def describe(threads):
    name, flags = cpu()
    simd = os.environ.get("HANLIN_SIMD", "(best)")
    return f"CPU: {name}; {' '.join(flags)}; {threads} threads; HANLIN_SIMD={simd}"
