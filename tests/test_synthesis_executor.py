from components.synthesis.executor import split_of, split_pattern


def test_pattern_follows_the_ratio_and_every_prefix_of_five_has_all_splits():
    pattern = split_pattern((7, 2, 1))
    assert [pattern.count(s) for s in range(3)] == [7, 2, 1]
    assert set(pattern[:5]) == {0, 1, 2}
    assert [split_pattern((6, 3, 1)).count(s) for s in range(3)] == [6, 3, 1]


def test_split_follows_each_pairs_occurrence():
    pattern = split_pattern((7, 2, 1))
    assert [split_of(n, pattern) for n in range(12)] == list(pattern) + list(pattern[:2])
