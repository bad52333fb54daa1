"""The regex table over parameter paths: stage labels, errors, split/merge/subset."""

import re

import jax
import numpy as np
import pytest
from flax import linen as nn

from freezeempath_jax import params as P_
from freezeempath_jax.models.presets import TINY
from freezeempath_jax.sharding import make_mesh
from freezeempath_jax.checkpoints.model_tree import abstract_boxed_params


@pytest.fixture(scope="module")
def tree():
    return nn.meta.unbox(abstract_boxed_params(TINY))


def test_paths_cover_every_part(tree):
    flat = P_.flatten_with_paths(tree)
    tops = {p.split("/")[0] for p in flat}
    assert tops == {"whisper", "projector", "emotion", "llm", "speech_decoder"}
    assert "llm/layers/attn/q_proj/kernel" in flat
    # Boxed and unboxed trees give the same paths.
    assert list(P_.flatten_with_paths(abstract_boxed_params(TINY))) == list(flat)


@pytest.mark.parametrize("stage,trained", [
    ("1", r"projector/.*"),
    ("2a", r"emotion/.*"),
    ("2b", r"emotion/.*"),
    ("3a", r"speech_decoder/(input_proj|lm|gate)/.*"),
    ("3b", r"speech_decoder/(input_proj|lm|gate)/.*"),
])
def test_stage_labels(tree, stage, trained):
    labels = P_.flatten_with_paths(P_.label_tree(tree, P_.stage_table(stage)))
    rx = re.compile(trained)
    n_train = 0
    for path, label in labels.items():
        expect = P_.TRAINABLE if rx.fullmatch(path) else P_.FROZEN
        assert label == expect, (stage, path, label)
        n_train += label == P_.TRAINABLE
        if path.startswith(("whisper/", "llm/")):
            assert label == P_.FROZEN
    assert n_train > 0


def test_first_match_wins_and_config_lists(tree):
    table = [["llm/layers/.*", "frozen"], ["llm/.*", "trainable"],
             [".*", "frozen"]]
    labels = P_.flatten_with_paths(P_.label_tree(tree, table))
    assert labels["llm/layers/mlp/up_proj/kernel"] == "frozen"
    assert labels["llm/norm/scale"] == "trainable"
    assert labels["llm/embed_tokens/embedding"] == "trainable"
    assert labels["whisper/conv1/kernel"] == "frozen"


def test_unmatched_path_names_it(tree):
    with pytest.raises(ValueError, match=r"whisper/conv1/bias.*matches no entry"):
        P_.label_tree(tree, [("(projector|emotion|llm|speech_decoder)/.*", "frozen"),
                             ("whisper/(?!conv1/bias).*", "frozen")])
    # An unknown top-level part never falls silently into a default.
    with pytest.raises(ValueError, match="adapter2/kernel"):
        P_.label_tree({"adapter2": {"kernel": np.zeros(2)}}, P_.stage_table("1"))


def test_bad_tables():
    with pytest.raises(ValueError, match="unknown training stage"):
        P_.stage_table("4")
    with pytest.raises(ValueError, match="bad regex"):
        P_.normalize_table([("llm/(", "frozen")])
    with pytest.raises(ValueError, match="pair"):
        P_.normalize_table(["llm/.*"])


def test_split_merge_round_trip():
    rng = np.random.default_rng(0)
    tree = {"projector": {"linear1": {"kernel": rng.normal(size=(4, 3)), "bias": np.zeros(3)}},
            "llm": {"norm": {"scale": np.ones(3)},
                    "layers": {"attn": {"q_proj": {"kernel": rng.normal(size=(2, 3, 1, 3))}}}},
            "emotion": {"ser_head": {"kernel": rng.normal(size=(3, 5))}}}
    labels = P_.label_tree(tree, P_.stage_table("1"))
    train, frozen = P_.split(tree, labels)
    assert set(P_.flatten_with_paths(train)) == {"projector/linear1/kernel",
                                                 "projector/linear1/bias"}
    assert "projector" not in frozen and set(frozen) == {"llm", "emotion"}
    back = P_.merge(train, frozen)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
        assert a is b
    # keep= selects the other side; a table works in place of a label tree.
    f2, t2 = P_.split(tree, P_.stage_table("1"), keep="frozen")
    assert P_.flatten_with_paths(f2).keys() == P_.flatten_with_paths(frozen).keys()
    assert P_.flatten_with_paths(t2).keys() == P_.flatten_with_paths(train).keys()
    with pytest.raises(ValueError, match="projector/linear1/bias.*both"):
        P_.merge(train, {"projector": {"linear1": {"bias": np.ones(3)}}})


def test_subset_and_masks(tree):
    sub = P_.subset(tree, r"emotion/(ser_head|attn_pool)/.*")
    paths = set(P_.flatten_with_paths(sub))
    assert "emotion/ser_head/kernel" in paths and "emotion/attn_pool/latent_queries" in paths
    assert all(p.startswith(("emotion/ser_head/", "emotion/attn_pool/")) for p in paths)
    decay = P_.flatten_with_paths(P_.mask_tree(tree, P_.NO_DECAY_REGEX))
    assert decay["llm/layers/input_norm/scale"] and decay["projector/linear1/bias"]
    assert not decay["projector/linear1/kernel"]
    assert not decay["llm/embed_tokens/embedding"]


def test_override_shardings(tree):
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    from jax.sharding import NamedSharding, PartitionSpec as P
    base = jax.tree.map(lambda _: NamedSharding(mesh, P("fsdp")), tree)
    out = P_.flatten_with_paths(P_.override_shardings(
        base, [("projector/.*", []), ("llm/lm_head/kernel", [None, "tensor"])], mesh))
    assert out["projector/linear2/kernel"].spec == P()
    assert out["llm/lm_head/kernel"].spec == P(None, "tensor")
    assert out["llm/norm/scale"].spec == P("fsdp")
