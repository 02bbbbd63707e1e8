"""Fixtures shared by several test files."""

import pytest


def pytest_addoption(parser):
    parser.addoption("--regenerate-golden", action="store_true",
                     help="rewrite tests/golden/ from this machine's golden run instead of checking against it "
                          "(tests/test_generate.py says when)")


@pytest.fixture(scope="session")
def make_story_dataset():
    """prepare(directory, count, seed): a dataset of `count` generated stories with a 320-token tokenizer."""
    from nanotrain.data.stories import generate_stories
    from nanotrain.prepare import prepare

    def make(directory, count: int, seed: int):
        directory.mkdir(parents=True, exist_ok=True)
        text = directory / "stories.txt"
        text.write_text("\n<|endoftext|>\n".join(generate_stories(count, seed=seed)))
        prepare([str(text)], directory / "data", vocab_size=320, seed=0, workers=1, verbose=False)
        return directory / "data"

    return make
