"""The marks transformers' test mixins use (registered so that pytest does not warn about each of them)."""


def pytest_configure(config):
    for mark in ("accelerate_tests", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test",
                 "torch_compile_test", "torch_export_test", "slow", "generate", "is_training_test", "kernels"):
        config.addinivalue_line("markers", f"{mark}: a mark of transformers' test mixins")
