import math
import unittest

import mlx.core as mx

from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    apply_xtc,
    categorical_sampling,
    make_frequency_penalty,
    make_logits_processors,
    make_presence_penalty,
    make_repetition_penalty,
    make_sampler,
)

NEG_INF = -float("inf")

# Two rows with the same probabilities in opposite order.
PROBS = [[0.5, 0.2, 0.15, 0.1, 0.05], [0.05, 0.1, 0.15, 0.2, 0.5]]


def logprobs_of(probs):
    return mx.log(mx.array(probs))


def kept(masked):
    """Indices of the entries that were not masked, row by row."""
    return [[i for i, v in enumerate(row) if v != NEG_INF] for row in masked.tolist()]


def frequencies(tokens, size):
    counts = [0] * size
    for t in tokens.tolist():
        counts[t] += 1
    return [c / len(tokens.tolist()) for c in counts]


class TestFilters(unittest.TestCase):
    def test_top_k(self):
        lp = logprobs_of(PROBS)
        self.assertEqual(kept(apply_top_k(lp, 1)), [[0], [4]])
        self.assertEqual(kept(apply_top_k(lp, 3)), [[0, 1, 2], [2, 3, 4]])
        self.assertEqual(kept(apply_top_k(lp, 5)), [[0, 1, 2, 3, 4]] * 2)
        self.assertEqual(kept(apply_top_k(lp, 50)), [[0, 1, 2, 3, 4]] * 2)

    def test_top_p(self):
        lp = logprobs_of(PROBS)
        cases = {
            0.3: [[0], [4]],
            0.5: [[0], [4]],
            0.6: [[0, 1], [3, 4]],
            0.8: [[0, 1, 2], [2, 3, 4]],
            0.9: [[0, 1, 2, 3], [1, 2, 3, 4]],
            1.0: [[0, 1, 2, 3, 4]] * 2,
        }
        for top_p, expected in cases.items():
            with self.subTest(top_p=top_p):
                self.assertEqual(kept(apply_top_p(lp, top_p)), expected)

    def test_top_p_accepts_unnormalized_scores(self):
        lp = logprobs_of(PROBS)
        self.assertEqual(kept(apply_top_p(lp + 3.0, 0.6)), [[0, 1], [3, 4]])

    def test_min_p(self):
        lp = logprobs_of(PROBS)
        # Floors: 0.35 * 0.5 = 0.175 and 0.25 * 0.5 = 0.125.
        self.assertEqual(kept(apply_min_p(lp, 0.35)), [[0, 1], [3, 4]])
        self.assertEqual(kept(apply_min_p(lp, 0.25)), [[0, 1, 2], [2, 3, 4]])
        self.assertEqual(kept(apply_min_p(lp, 0.9, 3)), [[0, 1, 2], [2, 3, 4]])
        self.assertEqual(kept(apply_min_p(lp, 0.0)), [[0, 1, 2, 3, 4]] * 2)

    def test_filters_keep_values(self):
        lp = logprobs_of(PROBS)
        for masked in (apply_top_k(lp, 2), apply_top_p(lp, 0.6), apply_min_p(lp, 0.35)):
            self.assertTrue(mx.array_equal(mx.where(masked == NEG_INF, lp, masked), lp))

    def test_filters_keep_dtype(self):
        lp = logprobs_of(PROBS).astype(mx.bfloat16)
        for masked in (apply_top_k(lp, 2), apply_top_p(lp, 0.6), apply_min_p(lp, 0.35)):
            self.assertEqual(masked.dtype, mx.bfloat16)
            self.assertEqual(kept(masked), [[0, 1], [3, 4]])


class TestXTC(unittest.TestCase):
    def test_drops_all_but_the_weakest_likely_token(self):
        scores = logprobs_of(PROBS)
        # Above 0.12: 0.5, 0.2 and 0.15; only 0.15 of them stays.
        self.assertEqual(kept(apply_xtc(scores, 1.0, 0.12)), [[2, 3, 4], [0, 1, 2]])
        self.assertEqual(kept(apply_xtc(scores, 1.0, 0.3)), [[0, 1, 2, 3, 4]] * 2)
        self.assertEqual(kept(apply_xtc(scores, 0.0, 0.12)), [[0, 1, 2, 3, 4]] * 2)
        # Listed tokens are never dropped.
        masked = apply_xtc(scores, 1.0, 0.12, xtc_special_tokens=[0])
        self.assertEqual(kept(masked), [[0, 2, 3, 4], [0, 1, 2]])
        kept_values = mx.where(masked == NEG_INF, 0, masked)
        self.assertTrue(
            mx.array_equal(kept_values, mx.where(masked == NEG_INF, 0, scores))
        )

    def test_applies_with_its_probability_per_row(self):
        mx.random.seed(4)
        scores = mx.broadcast_to(logprobs_of(PROBS[:1]), (4000, 5))
        applied = (apply_xtc(scores, 0.3, 0.12)[:, 0] == NEG_INF).astype(mx.float32)
        self.assertAlmostEqual(mx.mean(applied).item(), 0.3, delta=0.03)

    def test_sampler_never_draws_a_dropped_token(self):
        mx.random.seed(0)
        sample = make_sampler(temp=1.0, xtc_probability=1.0, xtc_threshold=0.12)
        scores = mx.broadcast_to(logprobs_of(PROBS[:1]), (2000, 5))
        counts = frequencies(sample(scores), 5)
        self.assertEqual(counts[:2], [0.0, 0.0])
        self.assertGreater(counts[2], 0.4)

    def test_validation(self):
        scores = logprobs_of(PROBS)
        with self.assertRaisesRegex(ValueError, "0.7"):
            apply_xtc(scores, 1.0, 0.7)
        with self.assertRaisesRegex(ValueError, "1.5"):
            make_sampler(temp=1.0, xtc_probability=1.5)


class TestSampler(unittest.TestCase):
    def test_greedy(self):
        lp = logprobs_of(PROBS)
        sampler = make_sampler()
        self.assertEqual(sampler(lp).tolist(), [0, 4])
        self.assertEqual(
            make_sampler(temp=0.0, top_k=3, top_p=0.5)(lp).tolist(), [0, 4]
        )

    def test_top_k_one_is_greedy(self):
        mx.random.seed(3)
        logits = mx.random.normal((8, 64))
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        sampler = make_sampler(temp=1.5, top_k=1)
        greedy = mx.argmax(lp, axis=-1)
        for _ in range(5):
            self.assertTrue(mx.array_equal(sampler(lp), greedy))

    def test_seeded_draws_repeat(self):
        lp = mx.zeros((2, 100)) - math.log(100)
        sampler = make_sampler(temp=1.0)

        def draws(seed):
            mx.random.seed(seed)
            return mx.stack([sampler(lp) for _ in range(20)]).tolist()

        self.assertEqual(draws(11), draws(11))
        self.assertNotEqual(draws(11), draws(12))

    def test_distribution(self):
        n = 4000
        probs = mx.array([0.6, 0.3, 0.1])
        lp = mx.broadcast_to(mx.log(probs), (n, 3))
        mx.random.seed(0)
        freq = frequencies(make_sampler(temp=1.0)(lp), 3)
        for f, p in zip(freq, probs.tolist()):
            self.assertAlmostEqual(f, p, delta=0.03)

        # Temperature 0.5 squares the probabilities before renormalizing.
        sharp = [p * p / 0.46 for p in probs.tolist()]
        freq = frequencies(make_sampler(temp=0.5)(lp), 3)
        for f, p in zip(freq, sharp):
            self.assertAlmostEqual(f, p, delta=0.03)

    def test_filtered_distribution(self):
        n = 4000
        lp = mx.broadcast_to(logprobs_of(PROBS[0]), (n, 5))
        mx.random.seed(1)
        freq = frequencies(make_sampler(temp=1.0, top_p=0.6)(lp), 5)
        self.assertEqual(freq[2:], [0.0, 0.0, 0.0])
        self.assertAlmostEqual(freq[0], 0.5 / 0.7, delta=0.03)

        freq = frequencies(make_sampler(temp=1.0, min_p=0.25)(lp), 5)
        self.assertEqual(freq[3:], [0.0, 0.0])
        self.assertAlmostEqual(freq[2], 0.15 / 0.85, delta=0.03)

        # top_k=3 leaves 0.5/0.2/0.15; top_p=0.75 of that keeps the first two.
        freq = frequencies(make_sampler(temp=1.0, top_k=3, top_p=0.75)(lp), 5)
        self.assertEqual(freq[2:], [0.0, 0.0, 0.0])

    def test_batch_rows_are_independent(self):
        lp = logprobs_of(PROBS)
        sampler = make_sampler(temp=1.0, top_p=0.6)
        mx.random.seed(5)
        seen = [set(), set()]
        for _ in range(200):
            first, second = sampler(lp).tolist()
            seen[0].add(first)
            seen[1].add(second)
        self.assertEqual(seen, [{0, 1}, {3, 4}])

    def test_output_shape(self):
        sampler = make_sampler(temp=0.7, top_k=2, top_p=0.9, min_p=0.05)
        tokens = sampler(logprobs_of(PROBS))
        self.assertEqual(tokens.shape, (2,))
        self.assertEqual(categorical_sampling(logprobs_of(PROBS), 1.0).shape, (2,))

    def test_validation(self):
        bad = [
            (dict(temp=-0.5), "-0.5"),
            (dict(temp=1.0, top_p=1.5), "1.5"),
            (dict(temp=1.0, top_p=-0.1), "-0.1"),
            (dict(temp=1.0, min_p=2.0), "2.0"),
            (dict(temp=1.0, top_k=-1), "-1"),
            (dict(temp=1.0, top_k=2.5), "2.5"),
            (dict(temp=1.0, min_tokens_to_keep=0), "0"),
        ]
        for kwargs, shown in bad:
            with self.subTest(**kwargs):
                with self.assertRaisesRegex(ValueError, shown):
                    make_sampler(**kwargs)
        lp = logprobs_of(PROBS)
        with self.assertRaisesRegex(ValueError, "1.2"):
            apply_top_p(lp, 1.2)
        with self.assertRaisesRegex(ValueError, "0"):
            apply_top_k(lp, 0)


class TestLogitsProcessors(unittest.TestCase):
    def test_defaults_make_nothing(self):
        self.assertEqual(make_logits_processors(), [])
        self.assertEqual(make_logits_processors(repetition_penalty=1.0), [])
        self.assertEqual(make_logits_processors(logit_bias={}), [])

    def test_logit_bias(self):
        (bias,) = make_logits_processors(logit_bias={1: 5.0, 3: -2.5})
        logits = mx.zeros((2, 4))
        out = bias(mx.array([0, 1]), logits)
        self.assertEqual(out.tolist(), [[0.0, 5.0, 0.0, -2.5]] * 2)
        self.assertEqual(logits.tolist(), [[0.0] * 4] * 2)

    def test_repetition_penalty(self):
        penalty = make_repetition_penalty(2.0, context_size=3)
        logits = mx.array([[1.0, -1.0, 2.0, 3.0, 4.0]])
        # Only the last three tokens (0, 0, 4) count, and 0 just once.
        out = penalty(mx.array([3, 1, 0, 0, 4]), logits)
        self.assertEqual(out.tolist(), [[0.5, -1.0, 2.0, 3.0, 2.0]])
        out = penalty(mx.array([3, 1, 4]), logits)
        self.assertEqual(out.tolist(), [[1.0, -2.0, 2.0, 1.5, 2.0]])
        self.assertEqual(
            penalty(mx.array([], dtype=mx.int32), logits).tolist(), logits.tolist()
        )
        self.assertEqual(penalty([2], logits).tolist(), [[1.0, -1.0, 1.0, 3.0, 4.0]])

    def test_repetition_penalty_batches(self):
        penalty = make_repetition_penalty(4.0)
        logits = mx.array([[4.0, 8.0, -1.0], [4.0, 8.0, -1.0]])
        shared = penalty(mx.array([1, 2]), logits)
        self.assertEqual(shared.tolist(), [[4.0, 2.0, -4.0]] * 2)
        per_row = penalty(mx.array([[0, 0], [1, 2]]), logits)
        self.assertEqual(per_row.tolist(), [[1.0, 8.0, -1.0], [4.0, 2.0, -4.0]])

    def test_presence_and_frequency_penalties(self):
        logits = mx.zeros((1, 5))
        tokens = mx.array([4, 1, 1, 2, 1])
        presence = make_presence_penalty(0.5, context_size=4)
        frequency = make_frequency_penalty(0.5, context_size=4)
        # The last four tokens: 1 three times, 2 once; 4 is out of the window.
        self.assertEqual(presence(tokens, logits).tolist(), [[0, -0.5, -0.5, 0, 0]])
        self.assertEqual(frequency(tokens, logits).tolist(), [[0, -1.5, -0.5, 0, 0]])
        # A negative penalty rewards repeats; rows may have their own history.
        rows = mx.array([[0, 0], [3, 2]])
        out = make_frequency_penalty(-1.0)(rows, mx.zeros((2, 4)))
        self.assertEqual(out.tolist(), [[2, 0, 0, 0], [0, 0, 1, 1]])
        empty = mx.array([], dtype=mx.int32)
        self.assertEqual(presence(empty, logits).tolist(), logits.tolist())
        processors = make_logits_processors(presence_penalty=0.5, frequency_penalty=1)
        self.assertEqual(len(processors), 2)
        self.assertEqual(make_logits_processors(presence_penalty=0), [])

    def test_processors_compose_in_order(self):
        processors = make_logits_processors(
            logit_bias={0: 1.0}, repetition_penalty=2.0, repetition_context_size=1
        )
        self.assertEqual(len(processors), 2)
        logits = mx.array([[1.0, 3.0]])
        tokens = mx.array([1, 0])
        for process in processors:
            logits = process(tokens, logits)
        # Bias first (1 -> 2), then the penalty on the last token only (2 -> 1).
        self.assertEqual(logits.tolist(), [[1.0, 3.0]])

    def test_validation(self):
        with self.assertRaisesRegex(ValueError, "-1.5"):
            make_logits_processors(repetition_penalty=-1.5)
        with self.assertRaisesRegex(ValueError, "0"):
            make_repetition_penalty(1.3, context_size=0)
        with self.assertRaisesRegex(ValueError, "'a'"):
            make_logits_processors(logit_bias={"a": 1.0})
        with self.assertRaisesRegex(ValueError, "nan"):
            make_logits_processors(presence_penalty=float("nan"))
        with self.assertRaisesRegex(ValueError, "frequency_context_size"):
            make_logits_processors(frequency_penalty=1.0, frequency_context_size=0)


if __name__ == "__main__":
    unittest.main()
