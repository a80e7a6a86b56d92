"""Operations: provisioning scripts and benchmarks (not part of the installed package)."""
