"""tensorwire benchmarks: `python -m benchmarks <name> --json`.

Every benchmark measures the raw limit it is compared against in the same run where one exists,
because this machine is shared and noisy: a ratio taken in one run means more than two absolute
figures taken minutes apart.
"""
