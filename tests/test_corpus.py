from labkit.corpus import NOVELS, corpus_text, paragraphs, read_novel, split_novel


def test_six_novels_split_into_train_and_heldout():
    for name in NOVELS:
        train, heldout = split_novel(name)
        assert len(heldout) > 50
        assert abs(len(heldout) / (len(train) + len(heldout)) - 0.05) < 0.01
        # held-out = the novel's end
        assert list(train) + list(heldout) == paragraphs(read_novel(name))


def test_paragraphs_are_joined_onto_one_line():
    text = "First line\nof a paragraph.\n\n\nSecond   one.\n"
    assert paragraphs(text) == ["First line of a paragraph.", "Second one."]
    heldout = corpus_text("heldout")
    assert all(len(p) > 0 for p in heldout.split("\n\n"))
    assert (
        "Pride" in split_novel("prideprejudice")[0][0]
        or "PRIDE" in split_novel("prideprejudice")[0][0]
    )


def test_bad_split_is_rejected():
    import pytest

    with pytest.raises(ValueError, match="split"):
        corpus_text("test")
