"""Build mansu's bundled fact sets: facts the embedded model knows, each asked in several wordings.

Run: python tools/build_fact_sets.py [NAME ...]   (rewrites src/mansu/datasets/NAME.jsonl; every set by default)
Each item gets three distractors drawn from the other answers of its domain, under a fixed seed, and keeps
the paraphrases (its domain's other wordings) that the model answers right in full precision; it needs two.
A new set keeps an item only if the model answers its prompt right in full precision and in NF4. The first
three sets (capitals, elements, languages) are frozen, since the README's demo numbers depend on capitals:
they keep their items (the ones answered right in full precision), reporting NF4 misses rather than
dropping them, and lose only an item that no two other wordings ask right.
"""
from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

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
CURRENCIES = {
    "Japan": "yen", "China": "yuan", "South Korea": "won", "India": "rupee", "Pakistan": "rupee", "Nepal": "rupee",
    "Sri Lanka": "rupee", "the United Kingdom": "pound", "Egypt": "pound", "the United States": "dollar",
    "Canada": "dollar", "Australia": "dollar", "New Zealand": "dollar", "Singapore": "dollar", "Mexico": "peso",
    "Argentina": "peso", "Chile": "peso", "Colombia": "peso", "the Philippines": "peso", "Cuba": "peso",
    "Brazil": "real", "Russia": "ruble", "Switzerland": "franc", "Sweden": "krona", "Iceland": "krona",
    "Norway": "krone", "Denmark": "krone", "Poland": "zloty", "Hungary": "forint", "Turkey": "lira",
    "South Africa": "rand", "Thailand": "baht", "Vietnam": "dong", "Indonesia": "rupiah", "Malaysia": "ringgit",
    "Israel": "shekel", "the United Arab Emirates": "dirham", "Morocco": "dirham", "Saudi Arabia": "riyal",
    "Qatar": "riyal", "Nigeria": "naira", "Kenya": "shilling", "Uganda": "shilling", "Tanzania": "shilling",
    "Germany": "euro", "France": "euro", "Italy": "euro", "Spain": "euro", "Ireland": "euro", "Greece": "euro",
    "the Czech Republic": "koruna", "Peru": "sol", "Bangladesh": "taka", "Ukraine": "hryvnia", "Romania": "leu",
    "Ghana": "cedi", "Kuwait": "dinar", "Iraq": "dinar", "Jordan": "dinar", "Serbia": "dinar", "Algeria": "dinar",
    "Tunisia": "dinar", "Venezuela": "bolivar", "Costa Rica": "colon", "Paraguay": "guarani", "Mongolia": "tugrik",
    "Cambodia": "riel", "Laos": "kip", "Myanmar": "kyat", "Ethiopia": "birr", "Zambia": "kwacha",
    "Botswana": "pula", "Georgia": "lari", "Armenia": "dram", "Kazakhstan": "tenge",
}
# Five continents only: where Oceania ends and Australia begins is a matter of convention.
CONTINENTS = {
    "Kenya": "Africa", "Nigeria": "Africa", "Ethiopia": "Africa", "Ghana": "Africa", "Senegal": "Africa",
    "Morocco": "Africa", "Algeria": "Africa", "Tunisia": "Africa", "South Africa": "Africa", "Uganda": "Africa",
    "Tanzania": "Africa", "Zimbabwe": "Africa", "Zambia": "Africa", "Angola": "Africa", "Cameroon": "Africa",
    "Mali": "Africa", "Sudan": "Africa", "Somalia": "Africa", "Madagascar": "Africa", "Botswana": "Africa",
    "Namibia": "Africa", "Libya": "Africa", "Rwanda": "Africa", "Mozambique": "Africa",
    "Japan": "Asia", "China": "Asia", "India": "Asia", "Thailand": "Asia", "Vietnam": "Asia", "Pakistan": "Asia",
    "Bangladesh": "Asia", "Nepal": "Asia", "Mongolia": "Asia", "South Korea": "Asia", "North Korea": "Asia",
    "Iran": "Asia", "Iraq": "Asia", "Saudi Arabia": "Asia", "Afghanistan": "Asia", "Malaysia": "Asia",
    "Cambodia": "Asia", "Laos": "Asia", "Sri Lanka": "Asia", "Syria": "Asia", "Jordan": "Asia",
    "the Philippines": "Asia", "Uzbekistan": "Asia",
    "France": "Europe", "Germany": "Europe", "Italy": "Europe", "Spain": "Europe", "Portugal": "Europe",
    "Poland": "Europe", "Sweden": "Europe", "Norway": "Europe", "Finland": "Europe", "Ireland": "Europe",
    "Austria": "Europe", "Hungary": "Europe", "Greece": "Europe", "Belgium": "Europe", "the Netherlands": "Europe",
    "Switzerland": "Europe", "Denmark": "Europe", "Ukraine": "Europe", "Romania": "Europe", "Croatia": "Europe",
    "Serbia": "Europe", "Iceland": "Europe", "the Czech Republic": "Europe",
    "Canada": "North America", "the United States": "North America", "Mexico": "North America",
    "Cuba": "North America", "Guatemala": "North America", "Honduras": "North America", "Panama": "North America",
    "Jamaica": "North America", "Haiti": "North America", "Nicaragua": "North America",
    "Costa Rica": "North America", "El Salvador": "North America",
    "Brazil": "South America", "Argentina": "South America", "Chile": "South America", "Peru": "South America",
    "Colombia": "South America", "Venezuela": "South America", "Bolivia": "South America",
    "Ecuador": "South America", "Paraguay": "South America", "Uruguay": "South America", "Guyana": "South America",
    "Suriname": "South America",
}
CITIES = {
    "Munich": "Germany", "Hamburg": "Germany", "Frankfurt": "Germany", "Cologne": "Germany", "Milan": "Italy",
    "Venice": "Italy", "Naples": "Italy", "Florence": "Italy", "Barcelona": "Spain", "Seville": "Spain",
    "Valencia": "Spain", "Marseille": "France", "Lyon": "France", "Bordeaux": "France", "Osaka": "Japan",
    "Kyoto": "Japan", "Hiroshima": "Japan", "Shanghai": "China", "Guangzhou": "China", "Mumbai": "India",
    "Kolkata": "India", "Bangalore": "India", "Sydney": "Australia", "Melbourne": "Australia",
    "Brisbane": "Australia", "Toronto": "Canada", "Vancouver": "Canada", "Montreal": "Canada",
    "Rio de Janeiro": "Brazil", "Sao Paulo": "Brazil", "Saint Petersburg": "Russia", "Novosibirsk": "Russia",
    "Istanbul": "Turkey", "Izmir": "Turkey", "Krakow": "Poland", "Gdansk": "Poland", "Porto": "Portugal",
    "Antwerp": "Belgium", "Geneva": "Switzerland", "Zurich": "Switzerland", "Salzburg": "Austria",
    "Gothenburg": "Sweden", "Bergen": "Norway", "Casablanca": "Morocco", "Marrakesh": "Morocco",
    "Alexandria": "Egypt", "Johannesburg": "South Africa", "Cape Town": "South Africa", "Lagos": "Nigeria",
    "Karachi": "Pakistan", "Lahore": "Pakistan", "Busan": "South Korea", "Ho Chi Minh City": "Vietnam",
    "Auckland": "New Zealand", "Guadalajara": "Mexico", "Cancun": "Mexico", "Chiang Mai": "Thailand",
    "Mombasa": "Kenya", "Medellin": "Colombia", "Valparaiso": "Chile",
}
ANIMAL_YOUNG = {
    "cat": "kitten", "dog": "puppy", "cow": "calf", "whale": "calf", "elephant": "calf", "giraffe": "calf",
    "horse": "foal", "sheep": "lamb", "goat": "kid", "pig": "piglet", "frog": "tadpole", "kangaroo": "joey",
    "bear": "cub", "lion": "cub", "tiger": "cub", "duck": "duckling", "goose": "gosling", "swan": "cygnet",
    "owl": "owlet", "eagle": "eaglet", "deer": "fawn", "hare": "leveret", "turkey": "poult",
    "butterfly": "caterpillar", "pigeon": "squab", "fish": "fry", "zebra": "foal", "donkey": "foal",
    "camel": "calf", "rhinoceros": "calf", "hippopotamus": "calf", "leopard": "cub", "cheetah": "cub",
    "panda": "cub", "koala": "joey", "toad": "tadpole", "moth": "caterpillar",
}
OPPOSITES = {
    "hot": "cold", "up": "down", "left": "right", "big": "small", "fast": "slow", "happy": "sad",
    "day": "night", "black": "white", "open": "closed", "true": "false", "rich": "poor", "wet": "dry",
    "full": "empty", "early": "late", "strong": "weak", "loud": "quiet", "tall": "short", "thick": "thin",
    "win": "lose", "love": "hate", "war": "peace", "push": "pull", "buy": "sell", "first": "last",
    "inside": "outside", "north": "south", "east": "west", "top": "bottom", "alive": "dead", "clean": "dirty",
    "friend": "enemy", "question": "answer", "always": "never", "before": "after", "give": "take",
    "male": "female", "positive": "negative", "maximum": "minimum", "success": "failure", "entrance": "exit",
    "odd": "even", "import": "export", "increase": "decrease", "ancient": "modern", "accept": "reject",
    "safe": "dangerous", "cheap": "expensive", "deep": "shallow", "brave": "cowardly", "heaven": "hell",
}


@dataclass(frozen=True)
class Domain:
    """One relation: subject -> answer facts, the prompt template and its paraphrase templates."""

    facts: dict[str, str]
    prompt: str
    paraphrases: tuple[str, ...]
    frozen: bool = False  # bundled before paraphrases: its items may be dropped, never changed or added


DOMAINS = {
    "capitals": Domain(CAPITALS, "The capital of {} is", (
        "Q: What is the capital of {}?\nA:", "The capital city of {} is", "The name of the capital city of {} is",
        "{} has its capital in"), frozen=True),
    "elements": Domain(ELEMENTS, "The chemical symbol for {} is", (
        "Q: What is the chemical symbol of {}?\nA:", "{} is a chemical element with the symbol",
        "Element: {}\nSymbol:", "On the periodic table, the symbol for {} is"), frozen=True),
    "languages": Domain(LANGUAGES, "The official language of {} is", (
        "Q: What is the official language of {}?\nA:", "In {}, the official language is",
        "The national language of {} is", "The language officially used in {} is"), frozen=True),
    "currencies": Domain(CURRENCIES, "The currency of {} is the", (
        "Q: What currency is used in {}?\nA: The", "In {}, people pay with the",
        "The money used in {} is called the", "Prices in {} are given in the national currency, the")),
    "continents": Domain(CONTINENTS, "{} is a country in", (
        "Q: On which continent is {}?\nA:", "{} lies on the continent of",
        "The continent where you find {} is", "Geographically, {} is part of")),
    "cities": Domain(CITIES, "The city of {} is in", (
        "Q: In which country is the city of {}?\nA:", "{} is a city in the country of",
        "The country where you find {} is", "To visit {}, you travel to")),
    "animal_young": Domain(ANIMAL_YOUNG, "A young {} is called a", (
        "Q: What is a baby {} called?\nA: A", "The baby of a {} is known as a",
        "When a {} is born, it is called a", "The word for a baby {} is")),
    "opposites": Domain(OPPOSITES, "The opposite of {} is", (
        'Q: What is the opposite of "{}"?\nA:', "The antonym of {} is",
        'The word that means the opposite of "{}" is', '"{}" is the opposite of')),
}


def _sentence(template: str, subject: str) -> str:
    """The template filled in, its first letter capitalised ("the Netherlands" may open a sentence)."""
    text = template.format(subject)
    return text[0].upper() + text[1:]


def candidates(domain: Domain, seed: int = 0) -> list[Item]:
    """One item per fact, with every paraphrase template; distractors drawn under `seed`."""
    rng = random.Random(seed)
    answers = sorted(set(domain.facts.values()))
    items = []
    for subject, answer in domain.facts.items():
        distractors = rng.sample([a for a in answers if a != answer], 3)
        choices = distractors + [answer]
        rng.shuffle(choices)
        paraphrases = tuple(_sentence(t, subject) for t in domain.paraphrases)
        items.append(Item(_sentence(domain.prompt, subject), answer, tuple(choices), paraphrases))
    return items


def _correct(model: torch.nn.Module, tokenizer, items: list[Item]) -> list[bool]:
    """Whether the model picks each item's answer among its choices."""
    return mansu.evaluate(model, tokenizer, items, batch_size=64, progress=False).correct


def _paraphrases_correct(model: torch.nn.Module, tokenizer, items: list[Item]) -> list[list[bool]]:
    """Per item, whether the model answers each of its paraphrases right (one batched evaluation)."""
    flat = iter(_correct(model, tokenizer, [p for it in items for p in it.paraphrased()]))
    return [[next(flat) for _ in it.paraphrases] for it in items]


def _rate(flags: list[bool]) -> str:
    """The share of True, as printed in the table."""
    return f"{sum(flags) / len(flags):.2f}" if flags else "-"


def build(name: str, domain: Domain, model: torch.nn.Module, nf4: torch.nn.Module, tokenizer) -> list[Item]:
    """The items of one set, with the paraphrases the model gets right; prints the set's numbers."""
    items = candidates(domain)
    full, quant = _correct(model, tokenizer, items), _correct(nf4, tokenizer, items)
    para_full, para_quant = _paraphrases_correct(model, tokenizer, items), _paraphrases_correct(nf4, tokenizer, items)
    kept, kept_quant, dropped = [], [], []
    for it, ok, ok_quant, para_ok, para_ok_quant in zip(items, full, quant, para_full, para_quant):
        good = [(p, q) for p, f, q in zip(it.paraphrases, para_ok, para_ok_quant) if f]
        if not (ok and (ok_quant or domain.frozen) and len(good) >= 2):
            dropped.append(it.prompt)
            continue
        if not ok_quant:
            print(f"  {name}: NF4 misses {it.prompt!r} -> {it.answer!r} (kept: the set is frozen)")
        kept.append(Item(it.prompt, it.answer, it.choices, tuple(p for p, _ in good)))
        kept_quant += [q for _, q in good]
    print(f"{name}: candidates {len(items)}, kept {len(kept)}; prompt full {_rate(full)} NF4 {_rate(quant)}; "
          f"paraphrases full {_rate(sum(para_full, []))} NF4 {_rate(sum(para_quant, []))}; "
          f"kept paraphrases {len(kept_quant)}, NF4 {_rate(kept_quant)}")
    if dropped:
        print(f"  dropped: {dropped}")
    return kept


def _facts(items: list[Item]) -> list[tuple]:
    """What a frozen set may not change: each item but its paraphrases."""
    return [(it.prompt, it.answer, it.choices) for it in items]


def main(names: list[str]) -> None:
    """Rebuild the named sets (every set if none) and print their numbers."""
    unknown = sorted(set(names) - set(DOMAINS))
    if unknown:
        raise SystemExit(f"unknown set(s) {unknown}; choose from {list(DOMAINS)}")
    model, tokenizer = mansu.load_model()
    nf4 = mansu.quantized_copy(model, "nf4")
    out = Path(__file__).resolve().parents[1] / "src" / "mansu" / "datasets"
    for name in names or DOMAINS:
        kept = build(name, DOMAINS[name], model, nf4, tokenizer)
        path = out / f"{name}.jsonl"
        if DOMAINS[name].frozen and not set(_facts(kept)) <= set(_facts(mansu.data.read_jsonl(path))):
            raise SystemExit(f"{name} would gain or change items, not only paraphrases; it is frozen: not written")
        mansu.data.write_jsonl(path, kept, replace=True)  # the bundled sets are this tool's own


if __name__ == "__main__":
    main(sys.argv[1:])
