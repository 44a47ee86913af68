"""A seeded synthetic corpus of short movie reviews with a mix of sentiment (the quickstart's IMDB).

Each review has an overall leaning (positive, negative or mixed) that biases, but does not fix,
the sentiment of every judgement in it, so a language model fitted to the corpus writes reviews
of every shade and the oracle (VADER) has something to prefer. A review is split into a prompt,
its first few words, and a completion, the rest, as the paper's IMDB setup cuts reviews after a
prefix.
"""
import random

OPENINGS = [
    "I watched this movie last night", "I saw this film with my family", "We rented this movie on a rainy day",
    "This film came out last year", "My friend told me to watch this movie", "I went to see this film",
    "This movie was on TV last week", "I finally watched this film", "The trailer for this movie",
    "This is the kind of film", "I had heard a lot about this movie", "Last weekend I saw this picture",
]
SUBJECTS = ["the acting", "the story", "the plot", "the music", "the ending", "the script", "the cast",
            "the camera work", "the dialogue", "the lead actor", "the director's work", "the pacing",
            "the first half", "the final scene"]
POSITIVE = ["wonderful", "brilliant", "beautiful", "excellent", "great", "moving", "funny", "charming",
            "superb", "delightful", "amazing", "good", "fantastic", "lovely"]
NEGATIVE = ["terrible", "boring", "awful", "dull", "horrible", "stupid", "weak", "bad", "painful",
            "disappointing", "poor", "annoying", "ugly", "pathetic"]
NEUTRAL = ["long", "quiet", "slow", "strange", "simple", "different", "unusual", "old-fashioned", "dark", "short"]
VERDICTS = {
    1: ["I loved every minute of it.", "I would happily watch it again.", "I highly recommend it.",
        "It is one of the best films of the year.", "What a great way to spend an evening."],
    -1: ["I hated every minute of it.", "I want my money back.", "Do not waste your time on it.",
         "It is one of the worst films of the year.", "What a waste of an evening."],
    0: ["It is worth a look if you have time.", "Some people will like it.", "It is an okay film.",
        "I have seen better and worse.", "Make up your own mind."],
}
TEMPLATES = ["{subject} was {adj}.", "{subject} is {adj} and {subject2} is {adj2}.",
             "I thought {subject} was {adj}.", "To be honest, {subject} felt {adj}.",
             "{subject} was {adj}, but {subject2} was {adj2}."]


def _adjective(rng, leaning):
    """A judgement drawn around the review's leaning: 70% agreeing, 15% opposite, 15% neutral
    (mixed reviews draw evenly)."""
    if leaning == 0:
        pool = rng.choice([POSITIVE, NEGATIVE, NEUTRAL])
    else:
        agree, oppose = (POSITIVE, NEGATIVE) if leaning > 0 else (NEGATIVE, POSITIVE)
        pool = rng.choices([agree, oppose, NEUTRAL], weights=[0.7, 0.15, 0.15])[0]
    return rng.choice(pool)


def review(rng):
    """One review: an opening, two or three judgements and a verdict."""
    leaning = rng.choice([1, -1, 0])
    sentences = [rng.choice(OPENINGS) + "."]
    for _ in range(rng.randint(2, 3)):
        subject, subject2 = rng.sample(SUBJECTS, 2)
        sentence = rng.choice(TEMPLATES).format(subject=subject, subject2=subject2, adj=_adjective(rng, leaning),
                                                adj2=_adjective(rng, leaning))
        sentences.append(sentence[0].upper() + sentence[1:])
    verdict = leaning if rng.random() < 0.8 else rng.choice([1, -1, 0])
    sentences.append(rng.choice(VERDICTS[verdict]))
    return " ".join(sentences)


def split_review(text, rng, prompt_words=(3, 5)):
    """(prompt, completion): the first 3-5 words, and the rest with its leading space."""
    words = text.split(" ")
    n = rng.randint(*prompt_words)
    return " ".join(words[:n]), " " + " ".join(words[n:])


def make_corpus(num_train, num_test, seed=0):
    """{"train": [...], "test": [...]} sft records {prompt, chosen}; distinct prompts+reviews per
    split are not enforced (as in real data, openings repeat)."""
    rng = random.Random(seed)
    corpus = {}
    for split, n in (("train", num_train), ("test", num_test)):
        records = []
        for _ in range(n):
            prompt, completion = split_review(review(rng), rng)
            records.append({"prompt": prompt, "chosen": completion})
        corpus[split] = records
    return corpus
