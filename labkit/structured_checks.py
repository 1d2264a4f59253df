"""Exercise check for notebook 07b (see labkit.checks: returns the student's function if it is right,
else labkit's reference, so the notebook always runs to the end)."""

import torch

from .checks import ExerciseFailure, run_check


def reference_token_mask(prefix, vocab, is_prefix, is_complete, eos_id):
    allowed = torch.tensor([bool(text) and is_prefix(prefix + text) for text in vocab])
    allowed[eos_id] = is_complete(prefix)
    return allowed


def check_token_mask(student):
    answers = ['{"answer": "yes"}', '{"answer": "no"}']

    def is_prefix(text):
        return any(a.startswith(text) for a in answers)

    def is_complete(text):
        return text in answers

    # a toy vocabulary: tokens that span grammar symbols ('{"', '":'), an empty special token (id 0),
    # an end-of-sequence token (id 1, whose text is "" as decode(skip_special_tokens) gives it)
    vocab = ["", "", "{", '{"', "answer", "ans", '":', ' "', "yes", "no", '"}', "}", "y", " ", "x"]
    eos = 1
    cases = ["", "{", '{"', '{"answer', '{"answer": "', '{"answer": "n', '{"answer": "yes"}']

    def test(fn):
        for prefix in cases:
            want = reference_token_mask(prefix, vocab, is_prefix, is_complete, eos)
            got = fn(prefix, vocab, is_prefix, is_complete, eos)
            if got is None:
                raise ExerciseFailure("your function returned None (did you forget `return`?)")
            got = torch.as_tensor(got).bool()
            if got.shape != want.shape:
                raise ExerciseFailure(
                    f"expected a mask of {len(vocab)} entries, got {tuple(got.shape)}"
                )
            if not torch.equal(got, want):
                wrong = [
                    vocab[t] or f"<id {t}>" for t in (got != want).nonzero().flatten().tolist()
                ]
                hint = ""
                if any(
                    got[t] and not want[t] and vocab[t] and is_prefix(vocab[t])
                    for t in range(len(vocab))
                ):
                    hint = " (check the prefix followed by the token's text: the token alone does not say where the output is)"
                elif got[0]:
                    hint = " (a token with no text never moves the output forward: allow it and decoding can loop)"
                elif got[eos] != want[eos]:
                    hint = " (end of sequence is allowed exactly when the prefix is already a complete answer)"
                raise ExerciseFailure(
                    f"after the prefix {prefix!r}: wrong for the tokens {wrong}{hint}"
                )

    return run_check("token_mask", student, reference_token_mask, test)
