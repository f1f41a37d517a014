"""Measurements of the example: run each from the repository root as a module,
e.g. `python3 -m benchmarks.recipes --small`. See benchmarks/README.md."""
import platform


def cpu_model():
    """The CPU's model name, as /proc/cpuinfo gives it (CPU timings depend on it more than on anything else)."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown CPU'
