import ctypes

from lib import allocator


def test_thresholds_set_on_linux_glibc(monkeypatch):
    for name in ("PRENAS_DEFAULT_MALLOC", *allocator.GLIBC_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    # The test machines run Linux with glibc, where mallopt accepts both values.
    assert allocator.keep_freed_memory() is True


def test_opt_out_variable_skips(monkeypatch):
    monkeypatch.setenv("PRENAS_DEFAULT_MALLOC", "1")
    assert allocator.keep_freed_memory() is False


def test_user_glibc_tuning_wins(monkeypatch):
    monkeypatch.delenv("PRENAS_DEFAULT_MALLOC", raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert allocator.keep_freed_memory() is False


def test_missing_libc_returns_false(monkeypatch):
    def no_library(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_library)
    assert allocator.keep_freed_memory() is False


def test_rejected_value_returns_false(monkeypatch):
    class FakeFunction:
        def __call__(self, parameter, value):
            return 0

    class FakeLibrary:
        mallopt = FakeFunction()

    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibrary())
    assert allocator.keep_freed_memory() is False
