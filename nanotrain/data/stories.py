"""The built-in corpus: a deterministic generator of simple children's stories.

The default run needs text that is real-looking, learnable in a minute on a CPU, and
available without a download. Each story has a cast (a child with a name, a friend who is
another child or an animal), an object and a place, and one small plot: a problem, some
dialogue, and a resolution, then an ending. Choices come from one seeded `random.Random`, so
`generate_stories(count, seed)` always returns the same list, with thousands of distinct
stories. Bump GENERATOR_VERSION whenever the output changes: the prepared corpus is cached
under a name that includes it.

`prepare_stories(count, vocab_size, seed)` turns the stories into a prepared dataset through
dataset_format's writer (the same one `nanotrain.prepare` uses), built on first use into the
cache directory (`cache_dir()`) and reused from there.
"""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path

from nanotrain.data.dataset_format import log, nearest_existing, read_meta, write_dataset
from nanotrain.errors import PrepareError, UnwritableOutput

GENERATOR_VERSION = 1

GIRLS = ["Lily", "Mia", "Sara", "Emma", "Zoe", "Anna", "Lucy", "Ella", "Rosa", "Amy", "Nina", "Kim"]
BOYS = ["Tom", "Ben", "Max", "Sam", "Leo", "Jack", "Tim", "Finn", "Noah", "Alex", "Omar", "Joe"]
ANIMALS = ["cat", "dog", "bunny", "duck", "frog", "bird", "fox", "bear", "mouse", "owl", "turtle", "puppy"]
PET_NAMES = ["Spot", "Fluffy", "Pip", "Bubbles", "Coco", "Max", "Sunny", "Button", "Daisy", "Rex"]
TRAITS = ["kind", "happy", "brave", "curious", "shy", "funny", "little", "gentle", "busy"]
OBJECTS = ["red ball", "blue kite", "toy boat", "teddy bear", "shiny stone", "little drum",
           "yellow hat", "picture book", "green balloon", "wooden car", "soft blanket", "toy train"]
PLACES = ["park", "garden", "beach", "forest", "farm", "big hill", "pond", "playground", "meadow", "lake"]
WEATHER = ["The sun was warm.", "The sky was blue and bright.", "A soft wind was blowing.",
           "There were big white clouds in the sky.", "It was a cool, sunny morning."]
OPENINGS = [
    "Once upon a time, there was a {trait} {kind} named {hero}.",
    "One day, a {trait} {kind} named {hero} woke up early.",
    "There once was a {trait} {kind} called {hero}.",
    "Once upon a time, in a small house near the {place}, lived a {kind} named {hero}.",
]
LOVES = ["{Sub} loved {pos} {obj} very much.", "{Pos} favorite toy was a {obj}.",
         "{Sub} took {pos} {obj} everywhere {sub} went."]
GO_OUT = ["One day, {hero} and {friend} went to the {place} to play.",
          "{hero} asked {friend} to come to the {place}.",
          "After breakfast, {hero} and {friend} walked to the {place}."]

# Each plot: the problem, what is said, and how it is solved. {obj}, {hero}, {friend}, {sub}
# (he/she), {pos} (his/her) and {place} are filled from the story's cast.
PLOTS = [
    {"problem": ["{hero} played with the {obj}, but then it was gone!",
                 "When it was time to go home, {hero} could not find the {obj}."],
     "talk": ['"Where is my {obj}?" {hero} cried.', '"Oh no! I lost my {obj}!" said {hero}.'],
     "help": ['"Do not be sad," said {friend}. "I will help you look."',
              '{friend} said, "Let us look together. Two can find more than one."'],
     "solve": ["They looked under a bush and behind a tree. At last, {friend} found the {obj} in the tall grass.",
               "They looked everywhere. Then {hero} saw the {obj} next to a big rock."],
     "end": ["{hero} hugged {friend} and said, \"Thank you! You are a good friend.\""]},
    {"problem": ["The wind blew the {obj} high up into a tree.",
                 "{hero} threw the {obj} too high, and it got stuck in a tree."],
     "talk": ['"I cannot reach it," said {hero}. "It is too high!"',
              '"My {obj}!" said {hero}. "How will I get it down?"'],
     "help": ['{friend} had an idea. "Let us ask for help."',
              '"I know what to do," said {friend}. "We can use a long stick."'],
     "solve": ["A tall man with a ladder came by. He climbed up and gave the {obj} back to {hero}.",
               "{friend} found a long stick. {hero} poked the branch, and the {obj} fell down into {pos} arms."],
     "end": ["{hero} was very happy. {Sub} learned that a problem is smaller when friends help."]},
    {"problem": ["Then dark clouds came, and it began to rain.",
                 "Suddenly, big drops of rain fell from the sky."],
     "talk": ['"Oh no, we will get wet!" said {friend}.', '"I do not like the rain," said {hero}.'],
     "help": ['{hero} looked around and said, "Look, there is a big tree. Come with me!"',
              '"Let us run to the little shed," said {hero}.'],
     "solve": ["They sat together and stayed dry until the rain stopped. Then they saw a rainbow.",
               "They waited and sang songs. Soon the sun came back out."],
     "end": ["{hero} and {friend} laughed and played in the puddles.", "They said the rain was fun after all."]},
    {"problem": ["{friend} wanted to play with the {obj} too, but {hero} did not want to share.",
                 "{hero} and {friend} both pulled the {obj}. They started to fight."],
     "talk": ['"It is mine!" said {hero}.', '"You never share!" said {friend}, and {friend} was sad.'],
     "help": ["{hero} saw that {friend} was sad. {Sub} felt bad in {pos} tummy.",
              'Mom came and said, "It is nice to share. Then you can both have fun."'],
     "solve": ['{hero} gave the {obj} to {friend} and said, "You can play with it first."',
               "They took turns with the {obj}. One turn for {hero}, one turn for {friend}."],
     "end": ["Sharing made the game more fun. {hero} and {friend} played all day.",
             "{hero} learned that sharing makes friends happy."]},
    {"problem": ["At the {place}, they found a little bird with a hurt wing.",
                 "Near the {place}, a small kitten was stuck and crying."],
     "talk": ['"Poor little thing," said {hero}. "We have to help it."',
              '"It looks scared," said {friend} softly.'],
     "help": ["{hero} was careful and gentle. {Sub} did not want to scare it.",
              '"Let us be very quiet," said {hero}.'],
     "solve": ["They took it home, and Mom helped them keep it warm. After a few days, it was well again.",
               "They gave it some water and a soft place to rest. Soon it was happy again."],
     "end": ["The little animal was their friend from that day on.", "{hero} felt proud and happy."]},
    {"problem": ["When night came, {hero} was scared of the dark.",
                 "{hero} heard a strange noise outside and felt scared."],
     "talk": ['"What is that?" {hero} asked in a small voice.', '"I am scared," said {hero}.'],
     "help": ['{friend} said, "Do not be afraid. I am here with you."',
              'Dad came in with a lamp and said, "Let us go and see together."'],
     "solve": ["They looked and saw it was only the wind in the trees.",
               "It was only a little owl saying hoot, hoot."],
     "end": ["{hero} smiled and was not scared anymore. {Sub} slept well that night.",
             "{hero} learned that things are less scary when you are brave."]},
]
ENDINGS = ["And they lived happily ever after.", "The end.", "It was the best day ever.",
           "From that day on, {hero} and {friend} were best friends.", ""]


def _cast(rng: random.Random) -> dict:
    """Pick the hero (a child) and the friend (a child or a named animal)."""
    girl = rng.random() < 0.5
    hero = rng.choice(GIRLS if girl else BOYS)
    if rng.random() < 0.5:
        friend = rng.choice([n for n in GIRLS + BOYS if n != hero])
    else:
        friend = f"{rng.choice(PET_NAMES)} the {rng.choice(ANIMALS)}"
    sub, pos = ("she", "her") if girl else ("he", "his")
    slots = dict(hero=hero, friend=friend, sub=sub, pos=pos, Sub=sub.capitalize(), Pos=pos.capitalize(),
                 kind="girl" if girl else "boy", trait=rng.choice(TRAITS),
                 obj=rng.choice(OBJECTS), place=rng.choice(PLACES))
    if friend.split()[0] == slots["hero"]:  # "Max the dog" next to a boy named Max reads badly
        slots["friend"] = f"{rng.choice(['Pip', 'Coco', 'Daisy'])} the {friend.split()[-1]}"
    return slots


def generate_story(rng: random.Random) -> str:
    """One story as a few paragraphs of plain text."""
    s = _cast(rng)
    plot = rng.choice(PLOTS)
    say = lambda options: rng.choice(options).format(**s)  # noqa: E731 - a local helper reads best
    friend_intro = f"{s['Pos']} best friend was {s['friend']}."
    opening = " ".join([say(OPENINGS), say(LOVES), friend_intro])
    outing = " ".join([say(GO_OUT), rng.choice(WEATHER)])
    middle = " ".join([say(plot["problem"]), say(plot["talk"]), say(plot["help"])])
    ending = " ".join(p for p in [say(plot["solve"]), say(plot["end"]), say(ENDINGS)] if p)
    return "\n\n".join([opening, outing, middle, ending])


def generate_stories(count: int, seed: int = 0) -> list[str]:
    """`count` stories, the same list for the same (count, seed, GENERATOR_VERSION)."""
    rng = random.Random(seed)
    return [generate_story(rng) for _ in range(count)]


# ----------------------------------------------------------------------------- the prepared corpus


def cache_dir() -> Path:
    """$NANOTRAIN_CACHE, else $XDG_CACHE_HOME/nanotrain, else ~/.cache/nanotrain."""
    if os.environ.get("NANOTRAIN_CACHE"):
        return Path(os.environ["NANOTRAIN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanotrain"


def prepare_stories(count: int, vocab_size: int, seed: int = 0, verbose: bool = True) -> Path:
    """The built-in story corpus as a prepared dataset, built on first use and cached.

    Safe when several processes (ranks) ask at once: the first takes a file lock and builds,
    the others wait on the lock and then find the finished directory.
    """
    out = cache_dir() / f"stories-v{GENERATOR_VERSION}-n{count}-v{vocab_size}-s{seed}"
    if read_meta(out) is not None:
        return out  # the common case: no lock, no hashing
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = open(out.parent / f"{out.name}.lock", "w")
    except OSError as e:
        raise PrepareError(_unwritable_cache(out.parent, e.strerror or str(e))) from None
    with lock, _exclusive(lock):
        if read_meta(out) is not None:
            return out  # another process built it while we waited for the lock
        stories = generate_stories(count, seed)
        sources = [{"name": "nanotrain.stories", "generator_version": GENERATOR_VERSION, "count": count, "seed": seed}]

        def documents():
            done = 0
            for story in stories:
                done += len(story) + 1
                yield story, done

        log(verbose, f"preparing the built-in story corpus ({count} stories) into '{out}'")
        try:
            write_dataset(documents, out, sources=sources, total_bytes=sum(len(s) + 1 for s in stories),
                          vocab_size=vocab_size, seed=seed, verbose=verbose)
        except UnwritableOutput as e:  # e.g. the disk filled up; the temporary directory is already gone
            raise PrepareError(_unwritable_cache(out.parent, e.reason)) from None
        except PrepareError as e:  # speak in the config keys the user actually set
            message = f"built-in story corpus: {e}".replace("--vocab_size", "data.stories_vocab_size")
            raise PrepareError(message) from None
        except OSError as e:  # any other failure of the cache directory
            raise PrepareError(_unwritable_cache(out.parent, e.strerror or str(e))) from None
    return out


def _unwritable_cache(directory: Path, reason: str) -> str:
    """The one-line message, with its fix, for a cache directory that cannot be created or written (`reason`: why)."""
    blocker = nearest_existing(directory)
    reason = f"'{blocker}' is a file, not a directory" if not blocker.is_dir() else reason
    return (f"cannot write the built-in corpus cache '{directory}' ({reason}); set NANOTRAIN_CACHE to a writable "
            "directory, or train on a prepared dataset with --data.path=DIR")


@contextlib.contextmanager
def _exclusive(file):
    try:
        import fcntl  # POSIX only; elsewhere the writer's temp-dir-and-rename still keeps racers safe
    except ImportError:
        yield
        return
    fcntl.flock(file, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(file, fcntl.LOCK_UN)
