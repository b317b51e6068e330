"""Build mansu's bundled fact sets: keep only facts the embedded model answers right in full precision.

Run: python tools/build_fact_sets.py   (writes src/mansu/datasets/*.jsonl)
Each item gets three distractors drawn from the other answers of its domain, under a fixed seed.
"""
from __future__ import annotations

import random
from pathlib import Path

import mansu
from mansu.data import Item

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens", "Austria": "Vienna", "Portugal": "Lisbon",
    "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Poland": "Warsaw", "Hungary": "Budapest", "Czech Republic": "Prague", "Belgium": "Brussels",
    "the Netherlands": "Amsterdam", "China": "Beijing", "South Korea": "Seoul", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Indonesia": "Jakarta", "the Philippines": "Manila", "India": "New Delhi",
    "Pakistan": "Islamabad", "Iran": "Tehran", "Iraq": "Baghdad", "Turkey": "Ankara", "Israel": "Jerusalem",
    "Saudi Arabia": "Riyadh", "Kenya": "Nairobi", "Nigeria": "Abuja", "Ethiopia": "Addis Ababa",
    "Argentina": "Buenos Aires", "Peru": "Lima", "Chile": "Santiago", "Colombia": "Bogota",
    "Venezuela": "Caracas", "Cuba": "Havana", "Mexico": "Mexico City", "Canada": "Ottawa",
    "Australia": "Canberra", "New Zealand": "Wellington", "Brazil": "Brasilia", "Ukraine": "Kyiv",
    "Romania": "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb",
    "Switzerland": "Bern", "Iceland": "Reykjavik", "Afghanistan": "Kabul", "Syria": "Damascus",
    "Lebanon": "Beirut", "Jordan": "Amman", "Morocco": "Rabat", "Algeria": "Algiers", "Tunisia": "Tunis",
    "Ghana": "Accra", "Senegal": "Dakar", "Nepal": "Kathmandu", "Bangladesh": "Dhaka",
    "Malaysia": "Kuala Lumpur", "Singapore": "Singapore", "Uganda": "Kampala", "Zimbabwe": "Harare",
}
ELEMENTS = {
    "hydrogen": "H", "helium": "He", "lithium": "Li", "carbon": "C", "nitrogen": "N", "oxygen": "O",
    "fluorine": "F", "neon": "Ne", "sodium": "Na", "magnesium": "Mg", "aluminium": "Al", "silicon": "Si",
    "phosphorus": "P", "sulfur": "S", "chlorine": "Cl", "argon": "Ar", "potassium": "K", "calcium": "Ca",
    "iron": "Fe", "copper": "Cu", "zinc": "Zn", "silver": "Ag", "gold": "Au", "mercury": "Hg", "lead": "Pb",
    "tin": "Sn", "uranium": "U", "nickel": "Ni", "cobalt": "Co", "platinum": "Pt", "iodine": "I",
    "bromine": "Br", "titanium": "Ti", "chromium": "Cr", "manganese": "Mn", "boron": "B", "beryllium": "Be",
    "tungsten": "W", "radon": "Rn", "xenon": "Xe", "krypton": "Kr", "plutonium": "Pu",
}
LANGUAGES = {
    "France": "French", "Germany": "German", "Italy": "Italian", "Spain": "Spanish", "Portugal": "Portuguese",
    "Brazil": "Portuguese", "Mexico": "Spanish", "Japan": "Japanese", "China": "Chinese", "Russia": "Russian",
    "Greece": "Greek", "Turkey": "Turkish", "Poland": "Polish", "Sweden": "Swedish", "Norway": "Norwegian",
    "Finland": "Finnish", "Denmark": "Danish", "the Netherlands": "Dutch", "Hungary": "Hungarian",
    "South Korea": "Korean", "Thailand": "Thai", "Vietnam": "Vietnamese", "Israel": "Hebrew", "Iran": "Persian",
    "Egypt": "Arabic", "Saudi Arabia": "Arabic", "Ukraine": "Ukrainian", "Romania": "Romanian",
    "Czech Republic": "Czech", "Indonesia": "Indonesian", "Argentina": "Spanish", "Austria": "German",
    "Iceland": "Icelandic", "Bulgaria": "Bulgarian", "Croatia": "Croatian", "Serbia": "Serbian",
    "Pakistan": "Urdu", "Bangladesh": "Bengali", "Malaysia": "Malay", "Kenya": "Swahili",
}
DOMAINS = {
    "capitals": (CAPITALS, "The capital of {} is"),
    "elements": (ELEMENTS, "The chemical symbol for {} is"),
    "languages": (LANGUAGES, "The official language of {} is"),
}


def candidates(facts: dict[str, str], template: str, seed: int = 0) -> list[Item]:
    rng = random.Random(seed)
    answers = sorted(set(facts.values()))
    items = []
    for subject, answer in facts.items():
        distractors = rng.sample([a for a in answers if a != answer], 3)
        choices = distractors + [answer]
        rng.shuffle(choices)
        items.append(Item(template.format(subject), answer, tuple(choices)))
    return items


def main() -> None:
    model, tokenizer = mansu.load_model()
    out = Path(__file__).resolve().parents[1] / "src" / "mansu" / "datasets"
    for name, (facts, template) in DOMAINS.items():
        items = candidates(facts, template)
        result = mansu.evaluate(model, tokenizer, items, progress=False)
        kept = [it for it, ok in zip(items, result.correct) if ok]
        print(f"{name}: kept {len(kept)} of {len(items)}")
        mansu.data.write_jsonl(out / f"{name}.jsonl", kept, replace=True)  # the bundled sets are this tool's own


if __name__ == "__main__":
    main()
