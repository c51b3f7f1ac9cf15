"""lazykv benchmarks: ``python -m benchmarks all`` or ``python -m benchmarks CASE``.

Run from the repository root. Cases (``python -m benchmarks --help`` lists them):
``load``, ``decode``, ``policies``, ``transient``, ``multimethod``, ``sessions``, ``export``.

Programs are exported once into ``benchmarks/cache/`` (keyed by a hash of the export
config and of the sources that shape the ``.pte``), each export in its own subprocess.
Every measurement that compares two things runs them side by side: load measurements
alternate static and lazy in fresh subprocesses; decode runs both programs in one process
in alternating blocks. Results go to ``benchmarks/results/latest.{json,md}`` plus PNG plots.
"""
