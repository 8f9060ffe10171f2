"""Where a benchmark ran: the CPU's name and the SIMD flags that matter to
the kernels, for the line every benchmark prints before its figures."""
import os

FLAGS = ("avx2", "fma", "f16c", "avx_vnni")


def cpu():
    """(model name with its family, model and last-level cache, the relevant
    SIMD flags) from /proc/cpuinfo and sysfs. A VM's model name is often
    just "Intel(R) Xeon(R) Processor", so family and model say which CPU
    it is; the cache says whether a model's weights can come from it
    rather than from memory (a 480 MiB L3 holds most of a 0.5B model, and
    decode then passes the ceiling that memory bandwidth implies)."""
    name, flags, fam, mod = "?", [], None, None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name == "?":
                    name = line.split(":", 1)[1].strip()
                if line.startswith("cpu family") and fam is None:
                    fam = line.split(":", 1)[1].strip()
                if line.split(":", 1)[0].strip() == "model" and mod is None:
                    mod = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    flags = [x for x in line.split(":", 1)[1].split() if x in FLAGS or x.startswith("avx512")]
    except OSError:
        pass
    extra = []
    if fam is not None and mod is not None:
        extra.append(f"family {fam} model {mod}")
    llc = last_level_cache()
    if llc:
        extra.append(f"L{llc[0]} {llc[1]}")
    if extra:
        name = f"{name} ({', '.join(extra)})"
    return name, flags


def last_level_cache():
    """(level, size as sysfs writes it, e.g. "480 MiB") of cpu0's largest
    cache, or None where sysfs does not say."""
    best = None
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in sorted(os.listdir(base)):
            if not d.startswith("index"):
                continue
            try:
                with open(f"{base}/{d}/level") as f:
                    level = int(f.read().strip())
                with open(f"{base}/{d}/size") as f:
                    size = f.read().strip()
            except (OSError, ValueError):
                continue
            if best is None or level > best[0]:
                best = (level, size)
    except OSError:
        return None
    if best is None:
        return None
    level, size = best
    for suffix, unit in (("K", "KiB"), ("M", "MiB")):
        if size.endswith(suffix) and size[:-1].isdigit():
            n = int(size[:-1])
            size = f"{n // 1024} MiB" if unit == "KiB" and n % 1024 == 0 else f"{n} {unit}"
    return level, size


def describe(threads):
    name, flags = cpu()
    simd = os.environ.get("HANLIN_SIMD", "(best)")
    return f"CPU: {name}; {' '.join(flags)}; {threads} threads; HANLIN_SIMD={simd}"
