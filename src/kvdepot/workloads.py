"""Synthetic, reproducible workloads: long documents with planted facts, and questions.

Pure code, no model or network. Used by `kvdepot demo` and the benchmarks. A document is a
fictional product handbook: every product has facts (codename, battery life, weight, ...)
stated once among filler prose, so a question has one right answer that can be checked.
The same seed always gives the same text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_PREFIXES = [
    "Aero",
    "Bolt",
    "Cirro",
    "Dyna",
    "Echo",
    "Flux",
    "Gyro",
    "Halo",
    "Ion",
    "Jet",
    "Kilo",
    "Lumo",
    "Mag",
    "Nova",
    "Orbi",
    "Pulse",
    "Quasar",
    "Rho",
    "Sigma",
    "Terra",
]
_SUFFIXES = ["tron", "lift", "wing", "scout", "rover", "arm", "drive", "sense", "mate", "core"]
_CITIES = [
    "Lisbon",
    "Osaka",
    "Denver",
    "Tallinn",
    "Porto",
    "Kyoto",
    "Austin",
    "Oslo",
    "Dublin",
    "Seville",
    "Quebec",
    "Leeds",
    "Turin",
    "Bergen",
    "Perth",
    "Ghent",
]
_ENGINEERS = [
    "Ada Moreau",
    "Bilal Haddad",
    "Chen Wei",
    "Dara Okafor",
    "Elena Petrova",
    "Farid Nasser",
    "Grace Lindqvist",
    "Hiro Tanaka",
    "Ines Duarte",
    "Jonas Berg",
]
_FILLER = [
    "The {p} was designed for warehouses where aisles are narrow and floors are uneven.",
    "Operators praised how quickly the {p} could be recalibrated between shifts.",
    "Every {p} ships with a maintenance log that records each service visit.",
    "Field trials of the {p} ran for several months before the general release.",
    "The control software of the {p} receives updates over a secured channel.",
    "Safety sensors on the {p} stop all motion when a person comes too close.",
    "The chassis of the {p} is made from recycled aluminium and reinforced polymer.",
    "Technicians can replace the wheels of the {p} without special tools.",
    "The {p} logs its energy use so that fleet managers can plan charging windows.",
    "Customers often pair the {p} with the fleet dashboard for remote monitoring.",
]  # fmt: skip


@dataclass(frozen=True, slots=True)
class Fact:
    """One checkable fact: the question that asks it and the answer's key string."""

    product: str
    question: str
    answer: str


@dataclass(frozen=True, slots=True)
class Document:
    title: str
    text: str
    facts: list[Fact]


def make_document(seed: int, num_products: int = 6, filler_per_product: int = 14) -> Document:
    """A handbook of `num_products` products; ~450 tokens per product at the default filler."""
    rng = random.Random(seed)
    names = rng.sample([p + s for p in _PREFIXES for s in _SUFFIXES], num_products)
    sections, facts = [], []
    for name in names:
        battery, weight = rng.randint(4, 19), rng.randint(12, 95)
        city, engineer = rng.choice(_CITIES), rng.choice(_ENGINEERS)
        year = rng.randint(2011, 2024)
        stated = [
            f"The {name} runs for {battery} hours on one charge.",
            f"The {name} weighs {weight} kilograms.",
            f"The {name} is assembled in {city}.",
            f"The lead engineer of the {name} is {engineer}.",
            f"The {name} was first released in {year}.",
        ]
        filler = [rng.choice(_FILLER).format(p=name) for _ in range(filler_per_product)]
        body = filler[:]
        for sentence in stated:
            body.insert(rng.randint(0, len(body)), sentence)
        sections.append(f"## {name}\n" + " ".join(body))
        facts += [
            Fact(name, f"How many hours does the {name} run on one charge?", f"{battery}"),
            Fact(name, f"How much does the {name} weigh, in kilograms?", f"{weight}"),
            Fact(name, f"In which city is the {name} assembled?", city),
            Fact(name, f"Who is the lead engineer of the {name}?", engineer),
            Fact(name, f"In which year was the {name} first released?", f"{year}"),
        ]
    title = f"Handbook {seed}"
    return Document(title, f"# {title}\n\n" + "\n\n".join(sections), facts)


@dataclass(frozen=True, slots=True)
class MultiDocQuestion:
    """A question over several documents given in a shuffled order.

    Attributes:
        order: indexes of the documents in the prompt, in prompt order.
        question: what is asked.
        answer: the key string a right answer contains.
        needs: indexes of the documents the answer needs (one or two).
    """

    order: tuple[int, ...]
    question: str
    answer: str
    needs: tuple[int, ...]


def make_multidoc_qa(
    seed: int,
    *,
    num_documents: int = 6,
    docs_per_prompt: int = 4,
    num_questions: int = 12,
    products_per_doc: int = 2,
    filler_per_product: int = 10,
) -> tuple[list[Document], list[MultiDocQuestion]]:
    """A pool of documents and questions, each over `docs_per_prompt` shuffled documents.

    Every third question compares two products from two documents ("Which weighs more, the
    X or the Y?", answered by a name); the others ask one planted fact of one document.
    """
    rng = random.Random(seed)
    docs = [
        make_document(seed * 1000 + i, products_per_doc, filler_per_product)
        for i in range(num_documents)
    ]
    questions = []
    for q in range(num_questions):
        order = tuple(rng.sample(range(num_documents), docs_per_prompt))
        if q % 3 == 2:
            first, second = rng.sample(order, 2)
            a = _weight_fact(rng, docs[first])
            b = _weight_fact(rng, docs[second])
            if a[1] == b[1]:
                continue
            heavier = a[0] if a[1] > b[1] else b[0]
            text = f"Which weighs more, the {a[0]} or the {b[0]}?"
            questions.append(MultiDocQuestion(order, text, heavier, (first, second)))
        else:
            needed = rng.choice(order)
            fact = rng.choice(docs[needed].facts)
            questions.append(MultiDocQuestion(order, fact.question, fact.answer, (needed,)))
    return docs, questions


def _weight_fact(rng: random.Random, doc: Document) -> tuple[str, int]:
    """(product, kilograms) of a random product of `doc`."""
    fact = rng.choice([f for f in doc.facts if "kilograms" in f.question])
    return fact.product, int(fact.answer)
