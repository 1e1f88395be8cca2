"""The optimized BLAS preload of mlx_lm._blas (Linux only).

Each check runs in a fresh interpreter, since the preload only works when
mlx_lm is imported before mlx.core.
"""

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import unittest

# Imported first on purpose: when this module is the first test module to be
# loaded, the rest of the suite also runs with the optimized BLAS.
import mlx_lm  # isort: skip

PROBE = textwrap.dedent("""
    import ctypes, json, os
    import mlx_lm
    import mlx.core as mx
    import numpy as np

    info = mlx_lm._blas.blas_info()

    def sgemm_address(lib):
        fn = getattr(lib, "cblas_sgemm", None)
        return fn and ctypes.cast(fn, ctypes.c_void_p).value

    mapped = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6:
                mapped.add(fields[5])

    result = {
        "info": info,
        "mapped": sorted(mapped),
        "global_sgemm": sgemm_address(ctypes.CDLL(None)),
        "blas_sgemm": info["loaded"] and sgemm_address(ctypes.CDLL(info["path"])),
    }

    # Products that reach cblas_sgemm with every transpose combination, an
    # odd size, a batch and the beta term of addmm.
    rng = np.random.default_rng(0)
    errors = []
    for shape_a, shape_b, ta, tb in [
        ((257, 129), (129, 65), False, False),
        ((129, 257), (129, 65), True, False),
        ((257, 129), (65, 129), False, True),
        ((3, 40, 33), (3, 33, 70), False, False),
    ]:
        a = rng.standard_normal(shape_a, dtype=np.float32)
        b = rng.standard_normal(shape_b, dtype=np.float32)
        xa = mx.array(a).swapaxes(-1, -2) if ta else mx.array(a)
        xb = mx.array(b).swapaxes(-1, -2) if tb else mx.array(b)
        na = np.swapaxes(a, -1, -2) if ta else a
        nb = np.swapaxes(b, -1, -2) if tb else b
        errors.append(float(np.abs(np.array(xa @ xb) - na @ nb).max()))
    c = rng.standard_normal((64, 48), dtype=np.float32)
    a = rng.standard_normal((64, 32), dtype=np.float32)
    b = rng.standard_normal((32, 48), dtype=np.float32)
    got = mx.addmm(mx.array(c), mx.array(a), mx.array(b), alpha=0.5, beta=2.0)
    errors.append(float(np.abs(np.array(got) - (2.0 * c + 0.5 * (a @ b))).max()))
    result["max_error"] = max(errors)
    print(json.dumps(result))
    """)


def run_probe(**env):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_LM_")}
    full_env.update(env)
    proc = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        raise AssertionError(f"probe failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@unittest.skipUnless(sys.platform.startswith("linux"), "the BLAS preload is Linux only")
class TestBlasPreload(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.enabled = run_probe()
        if not cls.enabled["info"]["loaded"]:
            raise unittest.SkipTest(
                "no optimized BLAS installed: " + cls.enabled["info"]["reason"]
            )

    def test_library_is_mapped(self):
        path = os.path.realpath(self.enabled["info"]["path"])
        self.assertIn(path, self.enabled["mapped"])

    def test_global_sgemm_is_the_optimized_one(self):
        self.assertIsNotNone(self.enabled["global_sgemm"])
        self.assertEqual(self.enabled["global_sgemm"], self.enabled["blas_sgemm"])

    def test_libmlx_binds_to_it(self):
        # The dynamic linker reports where each symbol of libmlx was found.  The
        # preload module runs on its own here, to keep that report short.
        code = (
            "import importlib.util as u, sys; "
            f"s = u.spec_from_file_location('blas', {mlx_lm._blas.__file__!r}); "
            "s.loader.exec_module(u.module_from_spec(s)); "
            "import mlx.core as mx; mx.eval(mx.ones((8, 8)) @ mx.ones((8, 8)))"
        )

        def sgemm_binding(**env):
            with tempfile.TemporaryDirectory() as tmp:
                log = os.path.join(tmp, "ld")
                clean = {
                    k: v for k, v in os.environ.items() if not k.startswith("MLX_LM_")
                }
                clean.update(env, LD_DEBUG="bindings", LD_DEBUG_OUTPUT=log)
                proc = subprocess.run(
                    [sys.executable, "-c", code], env=clean, timeout=120
                )
                self.assertEqual(proc.returncode, 0)
                for name in os.listdir(tmp):
                    with open(os.path.join(tmp, name)) as f:
                        for line in f:
                            if "libmlx" in line and "`cblas_sgemm'" in line:
                                return line.split(" to ")[1]
            self.fail("no binding of cblas_sgemm for libmlx was reported")

        path = self.enabled["info"]["path"]
        names = {os.path.basename(path), os.path.basename(os.path.realpath(path))}
        target = sgemm_binding()
        self.assertTrue(any(name in target for name in names), target)
        target = sgemm_binding(MLX_LM_NO_BLAS="1")
        self.assertFalse(any(name in target for name in names), target)

    def test_matmul_matches_numpy(self):
        self.assertLess(self.enabled["max_error"], 1e-3)

    def test_env_var_disables(self):
        disabled = run_probe(MLX_LM_NO_BLAS="1")
        self.assertFalse(disabled["info"]["loaded"])
        self.assertIn("MLX_LM_NO_BLAS", disabled["info"]["reason"])
        path = os.path.realpath(self.enabled["info"]["path"])
        self.assertNotIn(path, disabled["mapped"])
        self.assertLess(disabled["max_error"], 1e-3)

    def test_env_var_chooses_library(self):
        chosen = run_probe(MLX_LM_BLAS=self.enabled["info"]["path"])
        self.assertTrue(chosen["info"]["loaded"])
        self.assertIn("MLX_LM_BLAS", chosen["info"]["reason"])
        self.assertEqual(chosen["global_sgemm"], chosen["blas_sgemm"])

    def test_bad_env_library_is_reported(self):
        bad = run_probe(MLX_LM_BLAS="/nonexistent/libblas.so")
        self.assertFalse(bad["info"]["loaded"])
        self.assertIn("/nonexistent/libblas.so", bad["info"]["reason"])


class TestBlasInfo(unittest.TestCase):
    def test_info_keys(self):
        info = mlx_lm._blas.blas_info()
        self.assertEqual(set(info), {"path", "loaded", "reason"})
        self.assertIsInstance(info["loaded"], bool)
        self.assertTrue(info["reason"])


if __name__ == "__main__":
    unittest.main()
