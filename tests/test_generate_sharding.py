"""generate on 8 simulated CPU devices: a batch sharded over a mesh equals the one-device run.

The check runs in a subprocess because the device count is fixed when jax starts
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import importlib.util, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    sys.path.insert(0, {tests!r})
    import jaxdecode
    from fake_models import Bigram, cached

    assert jax.device_count() == 8, jax.devices()
    V, B, PLEN, N = 16, 16, 6, 8
    rng = np.random.RandomState(0)
    prompt = rng.randint(0, V, size=(B, PLEN)).astype(np.int32)
    lengths = rng.randint(1, PLEN + 1, size=(B,)).astype(np.int32)
    keys = jax.random.split(jax.random.key(0), B)
    temperature = np.linspace(0.0, 1.5, B).astype(np.float32)
    knobs = dict(top_k=8, top_p=0.95, repetition_penalty=1.3, presence_penalty=0.2, eos_id=2,
                 stop_sequences=[[5, 6]], min_new_tokens=1)
    bigram = Bigram.random(V, seed=3)
    meshes = {{
        "Mesh (auto axes)": Mesh(np.array(jax.devices()), ("data",)),
        "make_mesh (explicit axes)": jax.make_mesh((8,), ("data",)),
    }}
    for name, model in (("stateless", bigram), ("cached", cached(bigram))):
        ref = jaxdecode.generate(model, prompt, N, key=keys, temperature=temperature, prompt_lengths=lengths, **knobs)
        assert len(ref.tokens.sharding.device_set) == 1
        assert int(ref.num_generated.min()) < N  # some rows stopped early
        for mesh_name, mesh in meshes.items():
            rows = NamedSharding(mesh, P("data"))
            out = jaxdecode.generate(
                model,
                jax.device_put(prompt, NamedSharding(mesh, P("data", None))),
                N,
                key=jax.device_put(keys, rows),
                temperature=jax.device_put(temperature, rows),
                prompt_lengths=jax.device_put(lengths, rows),
                **knobs,
            )
            assert len(out.tokens.sharding.device_set) == 8, out.tokens.sharding
            for field in ref._fields:
                np.testing.assert_array_equal(np.asarray(getattr(out, field)), np.asarray(getattr(ref, field)),
                                              err_msg=f"{{name}} / {{mesh_name}}: {{field}}")
            print("ok", name, mesh_name, out.tokens.sharding.spec)

    # Beam search and speculative decoding: same guarantee on an Auto-axes mesh.
    mesh = meshes["Mesh (auto axes)"]
    rows = NamedSharding(mesh, P("data"))
    sp = jax.device_put(prompt, NamedSharding(mesh, P("data", None)))
    sl = jax.device_put(lengths, rows)
    cm = cached(bigram)
    ref = jaxdecode.beam_search(cm, prompt, 4, num_beams=3, num_return_sequences=2, prompt_lengths=lengths, eos_id=2)
    out = jaxdecode.beam_search(cm, sp, 4, num_beams=3, num_return_sequences=2, prompt_lengths=sl, eos_id=2)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(out.scores), np.asarray(ref.scores), rtol=1e-6)
    prop = jaxdecode.prompt_lookup(3, 2)
    ref = jaxdecode.speculative_generate(cm, prompt, N, proposer=prop, key=keys, temperature=temperature, prompt_lengths=lengths, eos_id=2)
    out = jaxdecode.speculative_generate(cm, sp, N, proposer=prop, key=jax.device_put(keys, rows),
                                         temperature=jax.device_put(temperature, rows), prompt_lengths=sl, eos_id=2)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    print("ok beam_search and speculative_generate sharded")

    spec = importlib.util.spec_from_file_location("sharded_generate", {example!r})
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main()["same"]
    print("ALL OK")
    """
).format(tests=str(ROOT / "tests"), example=str(ROOT / "examples" / "sharded_generate.py"))


def test_batch_sharded_generate_equals_single_device():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ALL OK" in proc.stdout
