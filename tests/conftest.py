"""The `conformance` selection the GPU check runs on CUDA (`pytest -m conformance`, see tests/on_device.py): the tests
marked so, and every test of the per-family conformance files."""

from benchmarks.gpu_check import CONFORMANCE_FILES


def pytest_configure(config):
    config.addinivalue_line("markers", "conformance: an architecture test that also runs on the GPU in bf16 "
                                       "(MOETUNE_TEST_DEVICE=cuda; benchmarks/gpu_check.py)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name.startswith(CONFORMANCE_FILES):
            item.add_marker("conformance")
