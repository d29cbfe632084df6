"""Build the toy speech corpora for grpo_speech.py: text, voices, manifests and audio.

Two stand-ins for the paper's data sets, made of real text-to-speech audio (eSpeak NG):

    ast/  English speech -> German text   (stands in for CoVoST2 En->De)
    sqa/  spoken passage + text question -> free-form answer sentence (LibriSQA Part I)

Every text is written by the generator below: a small English grammar with hand-checked German
rules (gender, case, adjective endings, verb-second and verb-final word order), and a template
generator for passages, questions and answers. Every clip has a voice recipe (accent + variant,
speed, pitch, pitch range) drawn from a seeded generator, so the whole corpus is a pure function
of this file and the pinned eSpeak NG build.

    python data/make_data.py                   # rebuild text, manifests and audio from scratch
    python data/make_data.py --synthesize      # only (re)make the audio the manifests list

The manifests are committed; the audio is not (about 200 MB of WAV): grpo_speech.py runs
`--synthesize` by itself the first time it needs a missing clip. See data/README.md.
"""
import argparse
import ctypes
import hashlib
import json
import multiprocessing
import os
import random
import sys
import wave
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
SAMPLE_RATE = 16_000
SEED = 1234

# Split sizes (clips). AST "pretrain" and SQA "pretrain" are kept apart from "train": they are the
# small amount of task data the toy base model saw before GRPO (see data/README.md).
SIZES = {
    "ast": {"pretrain": 600, "train": 2000, "dev": 150, "test": 250},
    "sqa": {"pretrain": 500, "train": 1200, "dev": 150, "test": 250},
}

# ---------------------------------------------------------------------------------------------
# Voices: accent x variant recipes. Test and dev voices are pairs never used in pretrain/train.
# ---------------------------------------------------------------------------------------------
ACCENTS = ["en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-us-nyc",
           "en-gb-x-gbclan", "en-gb-x-gbcwmd"]
VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5",
            "klatt", "klatt2", "klatt3", "edward", "adam", "benjamin", "caleb", "Hugo",
            "Reed", "announcer", "paul", "steph"]


def voice_splits(rng):
    pairs = [f"{accent}+{variant}" for accent in ACCENTS for variant in VARIANTS]
    rng.shuffle(pairs)
    return {"test": sorted(pairs[:24]), "dev": sorted(pairs[24:36]), "train": sorted(pairs[36:])}


def voice_recipe(rng, voices):
    return {"voice": rng.choice(voices), "speed": rng.randint(140, 200),
            "pitch": rng.randint(30, 70), "range": rng.randint(35, 85)}


# ---------------------------------------------------------------------------------------------
# AST grammar: one English sentence, one or more correct German translations.
# ---------------------------------------------------------------------------------------------
# German determiners by (kind, case, gender); gender "p" is plural.
DEFINITE = {"nom": dict(m="der", f="die", n="das", p="die"),
            "acc": dict(m="den", f="die", n="das", p="die"),
            "dat": dict(m="dem", f="der", n="dem", p="den")}
EIN_ENDING = {"nom": dict(m="", f="e", n="", p="e"),     # ein-, kein-, mein-, unser-
              "acc": dict(m="en", f="e", n="", p="e"),
              "dat": dict(m="em", f="er", n="em", p="en")}
# Adjective endings: weak after der-words, mixed after ein-words, strong with no determiner.
WEAK = {"nom": dict(m="e", f="e", n="e", p="en"), "acc": dict(m="en", f="e", n="e", p="en"),
        "dat": dict(m="en", f="en", n="en", p="en")}
MIXED = {"nom": dict(m="er", f="e", n="es", p="en"), "acc": dict(m="en", f="e", n="es", p="en"),
         "dat": dict(m="en", f="en", n="en", p="en")}
STRONG = {"nom": dict(m="er", f="e", n="es", p="e"), "acc": dict(m="en", f="e", n="es", p="e"),
          "dat": dict(m="em", f="er", n="em", p="en")}


class Noun:
    """English singular/plural; German gender, singular, plural; optional feminine form."""

    def __init__(self, en, en_pl, gender, de, de_pl, kind, fem=None, count=True):
        self.en, self.en_pl, self.gender, self.de, self.de_pl = en, en_pl, gender, de, de_pl
        self.kind, self.fem, self.count = kind, fem, count

    def forms(self, plural, case):
        """All acceptable German (gender, noun) forms: a job noun also has its feminine form."""
        options = [("p" if plural else self.gender, self.de_pl if plural else self.de)]
        if self.fem:
            options.append(("p", self.fem + "nen") if plural else ("f", self.fem))
        result = []
        for gender, word in options:
            if plural and case == "dat" and not word.endswith(("n", "s")):
                word += "n"                                       # den Kindern, mit drei Äpfeln
            result.append((gender, word))
        return result


def N(en, en_pl, gender, de, de_pl, kind, **kw):
    return Noun(en, en_pl, gender, de, de_pl, kind, **kw)


NOUNS = [
    # people
    N("man", "men", "m", "Mann", "Männer", "person"),
    N("woman", "women", "f", "Frau", "Frauen", "person"),
    N("child", "children", "n", "Kind", "Kinder", "person"),
    N("girl", "girls", "n", "Mädchen", "Mädchen", "person"),
    N("teacher", "teachers", "m", "Lehrer", "Lehrer", "person", fem="Lehrerin"),
    N("doctor", "doctors", "m", "Arzt", "Ärzte", "person", fem="Ärztin"),
    N("friend", "friends", "m", "Freund", "Freunde", "person", fem="Freundin"),
    N("baker", "bakers", "m", "Bäcker", "Bäcker", "person", fem="Bäckerin"),
    N("cook", "cooks", "m", "Koch", "Köche", "person", fem="Köchin"),
    N("driver", "drivers", "m", "Fahrer", "Fahrer", "person", fem="Fahrerin"),
    N("sister", "sisters", "f", "Schwester", "Schwestern", "person"),
    N("brother", "brothers", "m", "Bruder", "Brüder", "person"),
    N("mother", "mothers", "f", "Mutter", "Mütter", "person"),
    N("father", "fathers", "m", "Vater", "Väter", "person"),
    N("grandmother", "grandmothers", "f", "Großmutter", "Großmütter", "person"),
    # animals
    N("dog", "dogs", "m", "Hund", "Hunde", "animal"),
    N("cat", "cats", "f", "Katze", "Katzen", "animal"),
    N("horse", "horses", "n", "Pferd", "Pferde", "animal"),
    N("bird", "birds", "m", "Vogel", "Vögel", "animal"),
    N("cow", "cows", "f", "Kuh", "Kühe", "animal"),
    N("mouse", "mice", "f", "Maus", "Mäuse", "animal"),
    # food and drink
    N("apple", "apples", "m", "Apfel", "Äpfel", "food"),
    N("cake", "cakes", "m", "Kuchen", "Kuchen", "food"),
    N("egg", "eggs", "n", "Ei", "Eier", "food"),
    N("banana", "bananas", "f", "Banane", "Bananen", "food"),
    N("tomato", "tomatoes", "f", "Tomate", "Tomaten", "food"),
    N("potato", "potatoes", "f", "Kartoffel", "Kartoffeln", "food"),
    N("pear", "pears", "f", "Birne", "Birnen", "food"),
    N("sandwich", "sandwiches", "n", "Sandwich", "Sandwiches", "food"),
    N("soup", "soups", "f", "Suppe", "Suppen", "food", count=False),
    N("bread", "breads", "n", "Brot", "Brote", "food", count=False),
    N("cheese", "cheeses", "m", "Käse", "Käse", "food", count=False),
    N("coffee", "coffees", "m", "Kaffee", "Kaffees", "drink", count=False),
    N("tea", "teas", "m", "Tee", "Tees", "drink", count=False),
    N("milk", "milks", "f", "Milch", "Milche", "drink", count=False),
    N("water", "waters", "n", "Wasser", "Wasser", "drink", count=False),
    N("juice", "juices", "m", "Saft", "Säfte", "drink", count=False),
    # things to read and write
    N("book", "books", "n", "Buch", "Bücher", "text"),
    N("letter", "letters", "m", "Brief", "Briefe", "text"),
    N("newspaper", "newspapers", "f", "Zeitung", "Zeitungen", "text"),
    N("story", "stories", "f", "Geschichte", "Geschichten", "text"),
    N("map", "maps", "f", "Karte", "Karten", "text"),
    # objects
    N("car", "cars", "n", "Auto", "Autos", "thing"),
    N("bicycle", "bicycles", "n", "Fahrrad", "Fahrräder", "thing"),
    N("key", "keys", "m", "Schlüssel", "Schlüssel", "thing"),
    N("bag", "bags", "f", "Tasche", "Taschen", "thing"),
    N("chair", "chairs", "m", "Stuhl", "Stühle", "thing"),
    N("table", "tables", "m", "Tisch", "Tische", "thing"),
    N("phone", "phones", "n", "Telefon", "Telefone", "thing"),
    N("lamp", "lamps", "f", "Lampe", "Lampen", "thing"),
    N("ball", "balls", "m", "Ball", "Bälle", "thing"),
    N("cup", "cups", "f", "Tasse", "Tassen", "thing"),
    N("glass", "glasses", "n", "Glas", "Gläser", "thing"),
    N("picture", "pictures", "n", "Bild", "Bilder", "thing"),
    N("hat", "hats", "m", "Hut", "Hüte", "thing"),
    N("shoe", "shoes", "m", "Schuh", "Schuhe", "thing"),
    N("flower", "flowers", "f", "Blume", "Blumen", "thing"),
    N("umbrella", "umbrellas", "m", "Regenschirm", "Regenschirme", "thing"),
    N("computer", "computers", "m", "Computer", "Computer", "thing"),
    N("window", "windows", "n", "Fenster", "Fenster", "thing"),
    N("door", "doors", "f", "Tür", "Türen", "thing"),
    N("box", "boxes", "f", "Kiste", "Kisten", "thing"),
]
NOUNS_BY_KIND = {}
for _noun in NOUNS:
    NOUNS_BY_KIND.setdefault(_noun.kind, []).append(_noun)

# Adjectives: English, German stem, German stem before an ending (teuer -> teure), kinds it fits.
ADJECTIVES = [
    ("big", "groß", "groß", "thing animal"), ("small", "klein", "klein", "thing animal person"),
    ("old", "alt", "alt", "thing animal person text"), ("new", "neu", "neu", "thing text"),
    ("red", "rot", "rot", "thing food"), ("blue", "blau", "blau", "thing"),
    ("green", "grün", "grün", "thing food"), ("black", "schwarz", "schwarz", "thing animal"),
    ("white", "weiß", "weiß", "thing animal"), ("young", "jung", "jung", "person animal"),
    ("beautiful", "schön", "schön", "thing text animal"), ("long", "lang", "lang", "text"),
    ("cold", "kalt", "kalt", "drink"), ("warm", "warm", "warm", "drink food"),
    ("fresh", "frisch", "frisch", "food drink"), ("heavy", "schwer", "schwer", "thing"),
    ("cheap", "billig", "billig", "thing"), ("expensive", "teuer", "teur", "thing"),
    ("tired", "müde", "müd", "person animal"), ("friendly", "freundlich", "freundlich", "person"),
    ("funny", "lustig", "lustig", "text person"), ("sweet", "süß", "süß", "food drink"),
]

# Pronouns: English, English verb person, German options as (pronoun, person key).
# "you" has two correct German readings (du / Sie), which gives those sentences two references.
PRONOUNS = [("I", "1sg", [("ich", "1sg")]), ("you", "2", [("du", "2sg"), ("Sie", "3pl")]),
            ("he", "3sg", [("er", "3sg")]), ("she", "3sg", [("sie", "3sg")]),
            ("we", "1pl", [("wir", "1pl")]), ("they", "3pl", [("sie", "3pl")])]
NAMES = ["Anna", "Tom", "Maria", "Peter", "Lisa", "David", "Sarah", "Paul", "Emma", "Jack",
         "Laura", "Max", "Julia", "Ben", "Sophie", "Leo"]

PERSONS = ["1sg", "2sg", "3sg", "1pl", "2pl", "3pl"]


def conj(forms):
    """'liest/lese,liest,liest,lesen,lest,lesen' style: six present-tense forms."""
    return dict(zip(PERSONS, forms.split(",")))


class Verb:
    """English base/3sg forms; German infinitive and present forms; object kinds and case."""

    def __init__(self, en, en3, de_inf, de_forms, objects=(), case="acc", particle=""):
        self.en, self.en3, self.de_inf, self.de = en, en3, de_inf, conj(de_forms)
        self.objects, self.case, self.particle = objects.split() if objects else [], case, particle


TRANSITIVE = [
    Verb("read", "reads", "lesen", "lese,liest,liest,lesen,lest,lesen", "text"),
    Verb("eat", "eats", "essen", "esse,isst,isst,essen,esst,essen", "food"),
    Verb("drink", "drinks", "trinken", "trinke,trinkst,trinkt,trinken,trinkt,trinken", "drink"),
    Verb("buy", "buys", "kaufen", "kaufe,kaufst,kauft,kaufen,kauft,kaufen", "food drink text thing"),
    Verb("see", "sees", "sehen", "sehe,siehst,sieht,sehen,seht,sehen", "person animal thing"),
    Verb("need", "needs", "brauchen", "brauche,brauchst,braucht,brauchen,braucht,brauchen",
         "thing food"),
    Verb("have", "has", "haben", "habe,hast,hat,haben,habt,haben", "thing animal"),
    Verb("find", "finds", "finden", "finde,findest,findet,finden,findet,finden", "thing text"),
    Verb("write", "writes", "schreiben", "schreibe,schreibst,schreibt,schreiben,schreibt,schreiben",
         "text"),
    Verb("carry", "carries", "tragen", "trage,trägst,trägt,tragen,tragt,tragen", "thing"),
    Verb("like", "likes", "mögen", "mag,magst,mag,mögen,mögt,mögen", "food drink animal text"),
    Verb("wash", "washes", "waschen", "wasche,wäschst,wäscht,waschen,wascht,waschen",
         "thing animal"),
    Verb("sell", "sells", "verkaufen", "verkaufe,verkaufst,verkauft,verkaufen,verkauft,verkaufen",
         "food thing animal"),
    Verb("visit", "visits", "besuchen", "besuche,besuchst,besucht,besuchen,besucht,besuchen",
         "person"),
    Verb("help", "helps", "helfen", "helfe,hilfst,hilft,helfen,helft,helfen", "person", case="dat"),
    Verb("feed", "feeds", "füttern", "füttere,fütterst,füttert,füttern,füttert,füttern", "animal"),
    Verb("paint", "paints", "malen", "male,malst,malt,malen,malt,malen", "thing animal"),
    Verb("bring", "brings", "bringen", "bringe,bringst,bringt,bringen,bringt,bringen",
         "thing food drink"),
    Verb("look for", "looks for", "suchen", "suche,suchst,sucht,suchen,sucht,suchen",
         "thing person animal"),
]
INTRANSITIVE = [
    Verb("sleep", "sleeps", "schlafen", "schlafe,schläfst,schläft,schlafen,schlaft,schlafen"),
    Verb("work", "works", "arbeiten", "arbeite,arbeitest,arbeitet,arbeiten,arbeitet,arbeiten"),
    Verb("play", "plays", "spielen", "spiele,spielst,spielt,spielen,spielt,spielen"),
    Verb("sing", "sings", "singen", "singe,singst,singt,singen,singt,singen"),
    Verb("wait", "waits", "warten", "warte,wartest,wartet,warten,wartet,warten"),
    Verb("eat", "eats", "essen", "esse,isst,isst,essen,esst,essen"),
    Verb("get up", "gets up", "aufstehen", "stehe,stehst,steht,stehen,steht,stehen",
         particle="auf"),
    Verb("wake up", "wakes up", "aufwachen", "wache,wachst,wacht,wachen,wacht,wachen",
         particle="auf"),
]
MOTION = [Verb("go", "goes", "gehen", "gehe,gehst,geht,gehen,geht,gehen"),
          Verb("drive", "drives", "fahren", "fahre,fährst,fährt,fahren,fahrt,fahren"),
          Verb("come", "comes", "kommen", "komme,kommst,kommt,kommen,kommt,kommen")]
MODALS = [("wants to", "want to", conj("will,willst,will,wollen,wollt,wollen"),
           conj("möchte,möchtest,möchte,möchten,möchtet,möchten")),
          ("can", "can", conj("kann,kannst,kann,können,könnt,können"), None),
          ("must", "must", conj("muss,musst,muss,müssen,müsst,müssen"), None)]

# Places: English location, German location(s), English direction, German direction(s).
PLACES = [
    ("in the kitchen", ["in der Küche"], "to the kitchen", ["in die Küche"]),
    ("in the garden", ["im Garten"], "into the garden", ["in den Garten"]),
    ("in the park", ["im Park"], "to the park", ["in den Park", "zum Park"]),
    ("at school", ["in der Schule"], "to school", ["in die Schule", "zur Schule"]),
    ("at the station", ["am Bahnhof"], "to the station", ["zum Bahnhof"]),
    ("at the market", ["auf dem Markt"], "to the market", ["auf den Markt", "zum Markt"]),
    ("in the library", ["in der Bibliothek"], "to the library",
     ["in die Bibliothek", "zur Bibliothek"]),
    ("in the office", ["im Büro"], "to the office", ["ins Büro"]),
    ("in the city", ["in der Stadt"], "to the city", ["in die Stadt"]),
    ("in the forest", ["im Wald"], "to the forest", ["in den Wald"]),
    ("in the restaurant", ["im Restaurant"], "to the restaurant", ["ins Restaurant"]),
    ("in the museum", ["im Museum"], "to the museum", ["ins Museum"]),
    ("at the bakery", ["in der Bäckerei"], "to the bakery", ["in die Bäckerei", "zur Bäckerei"]),
    ("on the beach", ["am Strand"], "to the beach", ["an den Strand", "zum Strand"]),
    ("by the river", ["am Fluss"], "to the river", ["an den Fluss", "zum Fluss"]),
    ("at the lake", ["am See"], "to the lake", ["an den See", "zum See"]),
    ("at the zoo", ["im Zoo"], "to the zoo", ["in den Zoo", "zum Zoo"]),
    ("at home", ["zu Hause"], "home", ["nach Hause"]),
]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
           "twelve"]
DE_NUMBERS = ["zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun", "zehn", "elf",
              "zwölf"]
HOURS_EN = ["one"] + NUMBERS
HOURS_DE = ["eins"] + DE_NUMBERS
DAYS = [("Monday", "Montag"), ("Tuesday", "Dienstag"), ("Wednesday", "Mittwoch"),
        ("Thursday", "Donnerstag"), ("Friday", "Freitag"), ("Saturday", "Samstag"),
        ("Sunday", "Sonntag")]
PARTS_OF_DAY = [("in the morning", ["am Morgen", "morgens"]),
                ("in the evening", ["am Abend", "abends"]),
                ("in the afternoon", ["am Nachmittag", "nachmittags"]),
                ("at night", ["in der Nacht", "nachts"]),
                ("every day", ["jeden Tag"]), ("today", ["heute"])]
REASONS = [("because it is raining", "weil es regnet"), ("because it is cold", "weil es kalt ist"),
           ("because it is late", "weil es spät ist"), ("because it is warm", "weil es warm ist")]


def clock_time(rng):
    """('at half past seven', ['um halb acht']): German 'halb' names the coming hour."""
    hour = rng.randrange(12)
    kind = rng.choice(["oclock", "oclock", "half", "quarter_past", "quarter_to"])
    next_hour = (hour + 1) % 12
    if kind == "oclock":
        german = "ein" if hour == 0 else HOURS_DE[hour]      # "ein Uhr", not "eins Uhr"
        return f"at {HOURS_EN[hour]} o'clock", [f"um {german} Uhr"]
    if kind == "half":
        return f"at half past {HOURS_EN[hour]}", [f"um halb {HOURS_DE[next_hour]}"]
    if kind == "quarter_past":
        return f"at a quarter past {HOURS_EN[hour]}", [f"um Viertel nach {HOURS_DE[hour]}"]
    return f"at a quarter to {HOURS_EN[next_hour]}", [f"um Viertel vor {HOURS_DE[next_hour]}"]


def time_phrase(rng):
    choice = rng.random()
    if choice < 0.4:
        return clock_time(rng)
    if choice < 0.7:
        english, german = rng.choice(DAYS)
        if rng.random() < 0.3:
            return f"every {english}", [f"jeden {german}"]
        return f"on {english}", [f"am {german}"]
    return rng.choice(PARTS_OF_DAY)


def an(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


class NounPhrase:
    """A noun phrase with its English text and a German renderer for any case.

    determiner: "the", "a", "no" (kein), "my", "our", a number word, or None (mass noun).
    """

    def __init__(self, noun, determiner, plural=False, adjective=None, number=None):
        self.noun, self.determiner, self.plural = noun, determiner, plural
        self.adjective, self.number = adjective, number

    @property
    def person(self):
        return "3pl" if self.plural else "3sg"

    def english(self):
        words = [self.adjective[0]] if self.adjective else []
        words.append(self.noun.en_pl if self.plural else self.noun.en)
        text = " ".join(words)
        if self.determiner == "a":
            return an(text)
        if self.determiner == "number":
            return f"{NUMBERS[self.number]} {text}"
        return f"{self.determiner} {text}" if self.determiner else text

    def german(self, case):
        """All correct German renderings of this phrase in `case`."""
        results = []
        for gender, noun in self.noun.forms(self.plural, case):
            if self.determiner == "the":
                article, table = DEFINITE[case][gender], WEAK
            elif self.determiner in ("a", "no", "my", "our"):
                stem = {"a": "ein", "no": "kein", "my": "mein", "our": "unser"}[self.determiner]
                article, table = stem + EIN_ENDING[case][gender], MIXED
            elif self.determiner == "number":
                article, table = DE_NUMBERS[self.number], STRONG
            else:
                article, table = "", STRONG
            words = [article] if article else []
            if self.adjective:
                words.append(self.adjective[2] + table[case][gender])
            words.append(noun)
            results.append(" ".join(words))
        return results

    def negated(self):
        """'a cat' -> 'no cat' in German (kein); a bare mass noun too ('keinen Kaffee')."""
        assert self.determiner in ("a", None)
        return NounPhrase(self.noun, "no", self.plural, self.adjective, self.number)


def random_noun_phrase(rng, kinds, allow_number=True, allow_adjective=True):
    noun = rng.choice([n for kind in kinds for n in NOUNS_BY_KIND[kind]])
    adjective = None
    if allow_adjective and rng.random() < 0.35:
        fitting = [a for a in ADJECTIVES if noun.kind in a[3].split()]
        adjective = rng.choice(fitting) if fitting else None
    if not noun.count:
        return NounPhrase(noun, rng.choice(["the", None]), adjective=adjective)
    roll = rng.random()
    if allow_number and roll < 0.15:
        return NounPhrase(noun, "number", True, adjective, rng.randrange(len(NUMBERS)))
    if roll < 0.5:
        return NounPhrase(noun, "the", rng.random() < 0.25, adjective)
    if roll < 0.85 or noun.en in ("man", "woman"):        # not "my men"
        return NounPhrase(noun, "a", False, adjective)
    return NounPhrase(noun, rng.choice(["my", "our"]), rng.random() < 0.25, adjective)


class Subject:
    """A subject: pronoun, name or noun phrase; gives English text/person and German options."""

    def __init__(self, rng, kinds=("person",)):
        roll = rng.random()
        if roll < 0.3:
            self.english, self.en_person, options = rng.choice(PRONOUNS)
            self.german = [(pronoun, person) for pronoun, person in options]
        elif roll < 0.5:
            name = rng.choice(NAMES)
            self.english, self.en_person, self.german = name, "3sg", [(name, "3sg")]
        else:
            phrase = random_noun_phrase(rng, kinds, allow_number=rng.random() < 0.5)
            self.english, self.en_person = phrase.english(), phrase.person
            self.german = [(text, phrase.person) for text in phrase.german("nom")]


def en_verb(verb, person):
    return verb.en3 if person == "3sg" else verb.en


def en_do(person):
    return "does" if person == "3sg" else "do"


def capitalize(text):
    return text[0].upper() + text[1:]


def sentence(words, end="."):
    text = " ".join(w for w in words if w)
    return capitalize(text) + end


def make_ast_example(rng):
    """One English sentence and its German references (1 to 4 of them)."""
    kind = rng.choices(["statement", "negation", "question", "wh", "predicate", "modal",
                        "motion", "there_is", "subordinate"],
                       weights=[5, 2, 2, 2, 1.5, 2, 2, 1.5, 1.5])[0]
    return globals()[f"ast_{kind}"](rng)


def pick_verb_and_object(rng):
    verb = rng.choice(TRANSITIVE)
    obj = random_noun_phrase(rng, verb.objects)
    return verb, obj


def optional_adverbial(rng, place_probability=0.35, time_probability=0.35):
    place = rng.choice(PLACES) if rng.random() < place_probability else None
    time = time_phrase(rng) if rng.random() < time_probability else None
    return place, time


def ast_statement(rng):
    """S V O [place] [time]: both German verb-second orders (subject-first, adverbial-first)."""
    subject = Subject(rng)
    if rng.random() < 0.75:
        verb, obj = pick_verb_and_object(rng)
        en_obj, de_objs = obj.english(), obj.german(verb.case)
    else:
        verb, en_obj, de_objs = rng.choice(INTRANSITIVE), "", [""]
    place, time = optional_adverbial(rng)
    english = [subject.english, en_verb(verb, subject.en_person), en_obj,
               place[0] if place else "", time[0] if time else ""]
    references = []
    for de_subject, person in subject.german:
        for de_obj in de_objs:
            de_verb = verb.de[person]
            places = place[1] if place else [""]
            times = time[1] if time else [""]
            for de_place in places:
                for de_time in times:
                    # Time before place (TeKaMoLo); a verb particle closes the clause.
                    middle = [de_time, de_obj, de_place, verb.particle]
                    references.append(sentence([de_subject, de_verb] + middle))
                    fronted = de_time or de_place
                    if fronted:
                        rest = [de_time, de_obj, de_place, verb.particle]
                        rest.remove(fronted)
                        references.append(sentence([fronted, de_verb, de_subject] + rest))
    if time and rng.random() < 0.3:                # "In the morning, the man reads a book."
        english = [time[0] + ","] + english[:-1]
    return sentence(english), references


def ast_negation(rng):
    """'does not': kein for indefinite/mass objects, nicht otherwise."""
    subject = Subject(rng)
    if rng.random() < 0.7:
        verb = rng.choice(TRANSITIVE)
        obj = random_noun_phrase(rng, verb.objects, allow_number=False)
        if obj.determiner in ("a", None) and not obj.plural:
            de_objs, nicht = obj.negated().german(verb.case), ""
        else:
            de_objs, nicht = obj.german(verb.case), "nicht"
        en_obj = obj.english()
    else:
        verb, en_obj, de_objs, nicht = rng.choice(INTRANSITIVE), "", [""], "nicht"
    place = rng.choice(PLACES) if rng.random() < 0.3 else None
    english = [subject.english, en_do(subject.en_person), "not", verb.en, en_obj,
               place[0] if place else ""]
    references = []
    for de_subject, person in subject.german:
        for de_obj in de_objs:
            for de_place in (place[1] if place else [""]):
                # "nicht" follows a definite object and precedes the place phrase.
                references.append(sentence([de_subject, verb.de[person], de_obj, nicht, de_place,
                                            verb.particle]))
    return sentence(english), references


def ast_question(rng):
    """Yes/no question: the German verb comes first."""
    subject = Subject(rng)
    verb, obj = pick_verb_and_object(rng)
    place = rng.choice(PLACES) if rng.random() < 0.3 else None
    english = [en_do(subject.en_person), subject.english, verb.en, obj.english(),
               place[0] if place else ""]
    references = [sentence([verb.de[person], de_subject, de_obj, de_place], "?")
                  for de_subject, person in subject.german
                  for de_obj in obj.german(verb.case)
                  for de_place in (place[1] if place else [""])]
    return sentence(english, "?"), references


def ast_wh(rng):
    """Wh-questions: where is, what does .. verb, who verbs, how many."""
    form = rng.choice(["where_is", "what", "who", "how_many", "where_does"])
    if form == "where_is":
        phrase = random_noun_phrase(rng, ["thing", "animal", "person"], allow_number=False)
        phrase.determiner = rng.choice(["the", "my", "our"])
        be = "are" if phrase.plural else "is"
        de_be = "sind" if phrase.plural else "ist"
        return (sentence(["where", be, phrase.english()], "?"),
                [sentence(["wo", de_be, g], "?") for g in phrase.german("nom")])
    if form == "what":
        subject = Subject(rng)
        verb = rng.choice([v for v in TRANSITIVE if v.case == "acc"])
        place = rng.choice(PLACES) if rng.random() < 0.5 else None
        english = ["what", en_do(subject.en_person), subject.english, verb.en,
                   place[0] if place else ""]
        return sentence(english, "?"), [
            sentence(["was", verb.de[person], de_subject, de_place], "?")
            for de_subject, person in subject.german for de_place in (place[1] if place else [""])]
    if form == "who":
        verb, obj = pick_verb_and_object(rng)
        return (sentence(["who", verb.en3, obj.english()], "?"),
                [sentence(["wer", verb.de["3sg"], g], "?") for g in obj.german(verb.case)])
    if form == "how_many":
        subject = Subject(rng)
        verb = rng.choice([v for v in TRANSITIVE if v.case == "acc" and v.objects != ["drink"]])
        nouns = [n for kind in verb.objects for n in NOUNS_BY_KIND[kind] if n.count]
        noun = rng.choice(nouns)
        english = ["how many", noun.en_pl, en_do(subject.en_person), subject.english, verb.en]
        return sentence(english, "?"), [
            sentence(["wie viele", plural, verb.de[person], de_subject], "?")
            for de_subject, person in subject.german for _, plural in noun.forms(True, "acc")]
    subject = Subject(rng)
    verb = rng.choice([v for v in INTRANSITIVE if not v.particle and v.en != "eat"])
    english = ["where", en_do(subject.en_person), subject.english, verb.en]
    return sentence(english, "?"), [sentence(["wo", verb.de[person], de_subject], "?")
                                    for de_subject, person in subject.german]


def ast_predicate(rng):
    """X is (not) ADJ / Is X ADJ?: predicate adjectives take no ending."""
    phrase = random_noun_phrase(rng, ["thing", "animal", "person", "food", "drink"],
                                allow_number=False, allow_adjective=False)
    if phrase.determiner == "a" or phrase.determiner is None:
        phrase.determiner = "the"
    fitting = [a for a in ADJECTIVES if phrase.noun.kind in a[3].split()]
    adjective = rng.choice(fitting)
    be, de_be = ("are", "sind") if phrase.plural else ("is", "ist")
    form = rng.choice(["plain", "not", "question"])
    if form == "question":
        return (sentence([be, phrase.english(), adjective[0]], "?"),
                [sentence([de_be, g, adjective[1]], "?") for g in phrase.german("nom")])
    negation = "not" if form == "not" else ""
    return (sentence([phrase.english(), be, negation, adjective[0]]),
            [sentence([g, de_be, "nicht" if negation else "", adjective[1]])
             for g in phrase.german("nom")])


def ast_modal(rng):
    """Modal + infinitive: the German infinitive goes to the end of the clause."""
    subject = Subject(rng)
    en3, en_base, de_forms, de_alt = rng.choice(MODALS)
    negate = rng.random() < 0.3
    if rng.random() < 0.75:
        verb, obj = pick_verb_and_object(rng)
        en_obj = obj.english()
        if negate and obj.determiner in ("a", None) and not obj.plural:
            de_objs, nicht = obj.negated().german(verb.case), ""
        else:
            de_objs, nicht = obj.german(verb.case), "nicht" if negate else ""
    else:
        verb, en_obj, de_objs = rng.choice(INTRANSITIVE), "", [""]
        nicht = "nicht" if negate else ""
    place = rng.choice(PLACES) if rng.random() < 0.3 else None
    en_modal = en3 if subject.en_person == "3sg" else en_base
    if negate:
        en_modal = {"wants to": "does not want to", "want to": "do not want to", "can": "cannot",
                    "must": "must not"}[en_modal]
        if en3 == "must":                                  # "muss nicht" means "need not"
            de_forms = conj("darf,darfst,darf,dürfen,dürft,dürfen")
    english = [subject.english, en_modal, verb.en, en_obj, place[0] if place else ""]
    references = []
    for forms in [de_forms] + ([de_alt] if de_alt and not negate else []):
        for de_subject, person in subject.german:
            for de_obj in de_objs:
                for de_place in (place[1] if place else [""]):
                    references.append(sentence([de_subject, forms[person], de_obj, nicht,
                                                de_place, verb.de_inf]))
    return sentence(english), references


def ast_motion(rng):
    """S goes to PLACE [with X] [time]: time, then 'mit', then direction (TeKaMoLo)."""
    subject = Subject(rng)
    verb = rng.choice(MOTION)
    place = rng.choice(PLACES)
    companion = None
    if rng.random() < 0.4:
        companion = random_noun_phrase(rng, ["person", "animal"], allow_number=False,
                                       allow_adjective=False)
    time = time_phrase(rng) if rng.random() < 0.4 else None
    english = [subject.english, en_verb(verb, subject.en_person), place[2],
               "with " + companion.english() if companion else "", time[0] if time else ""]
    references = []
    companions = ["mit " + g for g in companion.german("dat")] if companion else [""]
    for de_subject, person in subject.german:
        for de_with in companions:
            for de_dir in place[3]:
                for de_time in (time[1] if time else [""]):
                    references.append(sentence([de_subject, verb.de[person], de_time, de_with,
                                                de_dir]))
                    if de_time:
                        references.append(sentence([de_time, verb.de[person], de_subject,
                                                    de_with, de_dir]))
    return sentence(english), references


def ast_there_is(rng):
    """There is/are X in PLACE: 'es gibt' + accusative, or X as the subject of 'sein'."""
    phrase = random_noun_phrase(rng, ["animal", "thing", "person"], allow_adjective=True)
    if phrase.determiner not in ("a", "number"):
        phrase = NounPhrase(phrase.noun, "a", False, phrase.adjective)
    place = rng.choice(PLACES[:-1])
    be, de_be = ("are", "sind") if phrase.plural else ("is", "ist")
    references = []
    for de_place in place[1]:
        for nominative, accusative in zip(phrase.german("nom"), phrase.german("acc")):
            references.append(sentence([de_place, de_be, nominative]))
            references.append(sentence(["es gibt", accusative, de_place]))
    return sentence(["there", be, phrase.english(), place[0]]), references


def ast_subordinate(rng):
    """Main clause + 'because'/'that' clause: the finite verb goes to the end (verb-final)."""
    subject = Subject(rng)
    verb, obj = pick_verb_and_object(rng)
    if rng.random() < 0.5:
        reason_en, reason_de = rng.choice(REASONS)
        place = rng.choice(PLACES)
        english = [subject.english, en_verb(verb, subject.en_person), obj.english(), place[0],
                   reason_en]
        references = [sentence([de_subject, verb.de[person], de_obj, de_place + ",", reason_de])
                      for de_subject, person in subject.german
                      for de_obj in obj.german(verb.case) for de_place in place[1]]
        return sentence(english), references
    opener_en, openers_de = rng.choice([("I think that", ["Ich glaube,", "Ich denke,"]),
                                        ("we know that", ["Wir wissen,"]),
                                        ("she says that", ["Sie sagt,"])])
    english = [opener_en, subject.english, en_verb(verb, subject.en_person), obj.english()]
    references = [sentence([opener, "dass", de_subject, de_obj, verb.de[person]])
                  for opener in openers_de for de_subject, person in subject.german
                  for de_obj in obj.german(verb.case)]
    return sentence(english), references


def dedupe(references, limit=4):
    seen = []
    for reference in references:
        if reference not in seen:
            seen.append(reference)
    return seen[:limit]


def ast_row(english, references):
    """A manifest row: ONE reference, the first rendering (subject first, "du", ...), as CoVoST2
    has one translation per clip; the other correct renderings are kept apart. They are what the
    base model's last stage learns (make_tiny_model.py), so the base's preferred style is not
    the task's and GRPO has a convention to learn, as a real base meets a new data set."""
    references = dedupe(references)
    return {"text": english, "translation": references[:1], "other_translations": references[1:]}


def sqa_row(passage, question, answers):
    """The same for SQA: ONE reference answer, the first wording (a full sentence naming its
    subject, as LibriSQA's answers are); the other correct wordings ("It is grey.", a shorter
    or longer sentence) go to `other_answers`, the base's own style, which scoring never reads."""
    answers = dedupe(answers)
    return {"text": passage, "question": question, "answer": answers[:1], "other_answers": answers[1:]}


# ---------------------------------------------------------------------------------------------
# SQA: a passage of 1-3 facts, a question about one of them, full-sentence answers.
# ---------------------------------------------------------------------------------------------
SQA_NAMES = {"Anna": "she", "Tom": "he", "Maria": "she", "Peter": "he", "Lisa": "she",
             "David": "he", "Sarah": "she", "Paul": "he", "Emma": "she", "Jack": "he",
             "Laura": "she", "Max": "he", "Julia": "she", "Ben": "he", "Sophie": "she",
             "Leo": "he", "Clara": "she", "Oscar": "he", "Nina": "she", "Felix": "he"}
COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "orange", "pink", "grey"]
OBJECTS = ["bicycle", "car", "hat", "bag", "umbrella", "coat", "kite", "ball", "lamp", "cup",
           "scarf", "chair", "boat", "jacket", "pen"]
SQA_PLACES = ["the market", "the park", "the library", "the station", "the museum", "the beach",
              "the zoo", "the cinema", "the bakery", "the river", "the lake", "the swimming pool",
              "the office", "the hospital", "the theatre"]
ITEMS = ["apples", "pears", "eggs", "oranges", "books", "letters", "cakes", "tomatoes",
         "flowers", "pencils", "cups", "candles"]
JOBS = ["teacher", "doctor", "baker", "farmer", "pilot", "nurse", "painter", "driver", "cook",
        "dentist", "gardener", "singer"]
CITIES = ["Paris", "Berlin", "London", "Rome", "Vienna", "Madrid", "Oslo", "Dublin", "Prague",
          "Lisbon", "Zurich", "Warsaw"]
ANIMALS = ["dog", "cat", "horse", "rabbit", "parrot", "turtle", "goat", "hamster"]
PET_NAMES = ["Bella", "Rocky", "Luna", "Charlie", "Daisy", "Oliver", "Milo", "Ruby", "Teddy",
             "Coco", "Bruno", "Rosie"]
GAMES = ["football", "chess", "tennis", "cards", "basketball", "volleyball"]
FOODS = ["fish", "rice", "soup", "cheese", "chocolate", "bread", "pasta", "salad", "honey",
         "carrots"]
EVENTS = ["concert", "meeting", "film", "lesson", "party", "game", "market", "show"]


def sqa_fact(rng, name, used):
    """One fact sentence about `name` and its questions with full-sentence answers.

    `used` collects attribute values already in the passage so that no two facts share one
    (a question must have a single answer in the audio).
    """
    def fresh(values):
        value = rng.choice([v for v in values if v not in used])
        used.add(value)
        return value

    kind = rng.choice(["color", "visit", "buy", "job", "wake", "pet", "game", "food", "event"])
    if kind == "color":
        color, obj = fresh(COLORS), fresh(OBJECTS)
        return kind, f"{name} has a {color} {obj}.", [
            (f"What color is {name}'s {obj}?", [f"{name}'s {obj} is {color}.", f"It is {color}."]),
            (f"What does {name} have?", [f"{name} has a {color} {obj}."])]
    if kind == "visit":
        day, place = fresh([d for d, _ in DAYS]), fresh(SQA_PLACES)
        return kind, f"On {day}, {name} goes to {place}.", [
            (f"Where does {name} go on {day}?", [f"{name} goes to {place} on {day}.",
                                                 f"On {day}, {name} goes to {place}."]),
            (f"When does {name} go to {place}?", [f"{name} goes to {place} on {day}.",
                                                  f"{name} goes there on {day}."])]
    if kind == "buy":
        number, items, place = rng.choice(NUMBERS), fresh(ITEMS), fresh(SQA_PLACES)
        return kind, f"{name} buys {number} {items} at {place}.", [
            (f"How many {items} does {name} buy?", [f"{name} buys {number} {items}."]),
            (f"What does {name} buy at {place}?", [f"{name} buys {number} {items} at {place}.",
                                                   f"{name} buys {number} {items}."]),
            (f"Where does {name} buy the {items}?", [f"{name} buys the {items} at {place}."])]
    if kind == "job":
        job, city = fresh(JOBS), fresh(CITIES)
        return kind, f"{name} works as {an(job)} in {city}.", [
            (f"What is {name}'s job?", [f"{name} works as {an(job)}.", f"{name} is {an(job)}."]),
            (f"Where does {name} work?", [f"{name} works in {city}."])]
    if kind == "wake":
        time = clock_time(rng)[0]
        used.add(time)
        return kind, f"Every day, {name} gets up {time}.", [
            (f"When does {name} get up?", [f"{name} gets up {time}.",
                                           f"{name} gets up {time} every day."])]
    if kind == "pet":
        animal, pet = fresh(ANIMALS), fresh(PET_NAMES)
        return kind, f"{name} has {an(animal)} called {pet}.", [
            (f"What is the name of {name}'s {animal}?", [f"The {animal} is called {pet}.",
                                                         f"{name}'s {animal} is called {pet}."]),
            (f"What animal does {name} have?", [f"{name} has {an(animal)}."])]
    if kind == "game":
        game, friend = fresh(GAMES), fresh([n for n in SQA_NAMES if n != name])
        return kind, f"{name} plays {game} with {friend}.", [
            (f"Who does {name} play {game} with?", [f"{name} plays {game} with {friend}."]),
            (f"What does {name} play with {friend}?", [f"{name} plays {game} with {friend}."])]
    if kind == "food":
        liked, disliked = fresh(FOODS), fresh(FOODS)
        return kind, f"{name} likes {liked} but does not like {disliked}.", [
            (f"What food does {name} like?", [f"{name} likes {liked}."]),
            (f"What food does {name} not like?", [f"{name} does not like {disliked}."])]
    event, day = fresh(EVENTS), fresh([d for d, _ in DAYS])
    time = clock_time(rng)[0]
    return kind, f"{name}'s {event} starts {time} on {day}.", [
        (f"When does {name}'s {event} start?", [f"{name}'s {event} starts {time} on {day}.",
                                                f"It starts {time} on {day}."])]


def make_sqa_example(rng):
    """Passage of 1-3 facts about one or two people; the question targets one fact."""
    people = rng.sample(sorted(SQA_NAMES), 2)
    used = set(people)
    facts = []
    kinds = set()
    for index in range(rng.choice([1, 2, 2, 3, 3])):
        for _ in range(20):                       # one fact of each kind, so answers are unique
            kind, text, questions = sqa_fact(rng, people[index % 2 if index else 0], used)
            if kind not in kinds:
                kinds.add(kind)
                facts.append((text, questions))
                break
    passage = " ".join(text for text, _ in facts)
    question, answers = rng.choice(rng.choice(facts)[1])
    return passage, question, answers


# ---------------------------------------------------------------------------------------------
# Splits and manifests
# ---------------------------------------------------------------------------------------------
def build_texts(rng):
    """Unique texts per task, split so that no sentence (AST) or passage (SQA) is shared."""
    examples = {}
    for task, sizes in SIZES.items():
        total = sum(sizes.values())
        seen, rows = set(), []
        while len(rows) < total:
            if task == "ast":
                english, references = make_ast_example(rng)
                key, row = english, ast_row(english, references)
            else:
                passage, question, answers = make_sqa_example(rng)
                key, row = passage, sqa_row(passage, question, answers)
            if key not in seen:
                seen.add(key)
                rows.append(row)
        start = 0
        for split, size in sizes.items():
            examples[(task, split)] = rows[start:start + size]
            start += size
    return examples


def write_manifests():
    rng = random.Random(SEED)
    voices = voice_splits(rng)
    examples = build_texts(rng)
    manifests = []
    for (task, split), rows in examples.items():
        split_voices = voices["train" if split in ("train", "pretrain") else split]
        path = DATA_DIR / task / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = []
        for index, row in enumerate(rows):
            recipe = voice_recipe(rng, split_voices)
            uid = f"{task}-{split}-{index:05d}"
            lines.append({"id": uid, "audio": f"audio/{uid}.wav", "duration": None,
                          "speaker": recipe["voice"], **row, "tts": recipe})
        manifests.append((path, lines))
    return manifests


def write_jsonl(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# Audio: eSpeak NG through ctypes. The library keeps state between calls (a second synthesis in
# one process differs from the first), so each clip is synthesized in a child forked from a
# small worker that has only initialised the library: every clip starts from the same state.
# Noise is seeded; the 22,050 Hz output is resampled to 16 kHz with torchaudio and rounded to
# 16-bit PCM (no dither).
# ---------------------------------------------------------------------------------------------
_ESPEAK = {}


def espeak_worker_init():
    import espeakng_loader
    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    _ESPEAK["rate"] = lib.espeak_Initialize(2, 0, espeakng_loader.get_data_path().encode(), 0)
    _ESPEAK["lib"] = lib                                     # 2 = synchronous mode


def espeak_synthesize_here(text, recipe):
    """Synthesize one clip in this process; returns 22,050 Hz int16 bytes."""
    lib, chunks = _ESPEAK["lib"], []
    callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                     ctypes.c_void_p)

    def collect(samples, count, events):
        if samples and count > 0:
            chunks.append(ctypes.string_at(samples, count * 2))
        return 0

    callback = callback_type(collect)
    lib.espeak_SetSynthCallback(callback)
    lib.espeak_ng_SetRandSeed(0)                              # otherwise seeded from the clock
    if lib.espeak_SetVoiceByName(recipe["voice"].encode()) != 0:
        raise RuntimeError(f"eSpeak NG has no voice {recipe['voice']!r}")
    lib.espeak_SetParameter(1, recipe["speed"], 0)            # words per minute
    lib.espeak_SetParameter(3, recipe["pitch"], 0)            # base pitch, 0-100
    lib.espeak_SetParameter(4, recipe["range"], 0)            # pitch range, 0-100
    data = text.encode("utf-8") + b"\0"
    lib.espeak_Synth(data, len(data), 0, 1, 0, 1, None, None)   # 1 = UTF-8 text
    lib.espeak_Synchronize()
    return b"".join(chunks)


def espeak_synthesize(job):
    """Synthesize one clip in a forked child; returns (int16 bytes, sample rate)."""
    text, recipe = job
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:                                                # child
        os.close(read_end)
        status = 0
        try:
            pcm = espeak_synthesize_here(text, recipe)
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(pcm)
        except BaseException:
            status = 1
        os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        pcm = pipe.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not pcm:
        raise RuntimeError(f"eSpeak NG failed on {text!r} with voice {recipe['voice']!r}")
    return pcm, _ESPEAK["rate"]


def to_16k_wav(pcm, resample, path):
    """Resample with torchaudio and write 16-bit PCM WAV (rounding, no dither)."""
    import torch
    samples = torch.frombuffer(bytearray(pcm), dtype=torch.int16).float() / 32768.0
    samples = resample(samples)
    pcm16 = (samples * 32768.0).round().clamp(-32768, 32767).to(torch.int16)
    tmp = path.with_suffix(".tmp")
    with wave.open(str(tmp), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(SAMPLE_RATE)
        f.writeframes(pcm16.numpy().tobytes())
    os.replace(tmp, path)                          # never leave a half-written clip behind
    return pcm16.numel() / SAMPLE_RATE


def synthesize(jobs, workers=None, desc="synthesizing"):
    """jobs: list of (text, recipe, output path). Returns durations in seconds, in order."""
    import torch
    import torchaudio
    from tqdm import tqdm
    torch.set_num_threads(1)         # this process only resamples; the cores belong to eSpeak
    resamplers = {}
    # Workers come from a fork server, not from this process: it may have imported torch, and
    # a process that small forks in about a millisecond.
    context = multiprocessing.get_context("forkserver")
    durations = []
    with context.Pool(workers or os.cpu_count(), initializer=espeak_worker_init) as pool:
        results = pool.imap(espeak_synthesize, [(text, recipe) for text, recipe, _ in jobs],
                            chunksize=8)
        for (_, _, path), (pcm, rate) in tqdm(zip(jobs, results), total=len(jobs), desc=desc,
                                              unit="clip", file=sys.stderr):
            path.parent.mkdir(parents=True, exist_ok=True)
            if rate not in resamplers:                      # the filter is built once
                resamplers[rate] = torchaudio.transforms.Resample(rate, SAMPLE_RATE)
            durations.append(round(to_16k_wav(pcm, resamplers[rate], path), 3))
    return durations


def manifest_jobs(path, lines, missing_only):
    jobs = []
    for line in lines:
        audio = path.parent / line["audio"]
        if not (missing_only and audio.exists()):
            jobs.append((line["text"], line["tts"], audio))
    return jobs


def synthesize_missing(manifest_paths, workers=None):
    """Make every clip a toy manifest lists but the disk lacks (first use after a clone)."""
    jobs = []
    for path in manifest_paths:
        lines, skipped = [], []
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, text in enumerate(f, start=1):
                try:
                    line = json.loads(text) if text.strip() else None
                except json.JSONDecodeError:       # not a toy manifest line: not ours to make
                    skipped.append(number)
                    continue
                if isinstance(line, dict) and isinstance(line.get("tts"), dict) and "audio" in line:
                    lines.append(line)
        if skipped:
            print(f"{path}:{skipped[0]}: not JSON ({len(skipped)} such lines skipped)", file=sys.stderr)
        jobs += manifest_jobs(Path(path), lines, True)
    if jobs:
        print(f"Synthesizing {len(jobs)} missing toy clips with eSpeak NG (once).", file=sys.stderr)
        synthesize(jobs, workers)
    return len(jobs)


def toy_manifests():
    return sorted(DATA_DIR.glob("*/*.jsonl"))


def build_all(workers=None):
    manifests = write_manifests()
    jobs = [job for path, lines in manifests for job in manifest_jobs(path, lines, False)]
    durations = iter(synthesize(jobs, workers))
    summary = {}
    for path, lines in manifests:
        for line in lines:
            line["duration"] = next(durations)
        write_jsonl(path, lines)
        summary[f"{path.parent.name}/{path.name}"] = {
            "clips": len(lines), "hours": round(sum(l["duration"] for l in lines) / 3600, 3),
            "voices": len({l["speaker"] for l in lines})}
    digest = hashlib.sha256()
    for _, _, audio in jobs:
        digest.update(audio.read_bytes())
    summary["audio_sha256"] = digest.hexdigest()
    print(json.dumps(summary, indent=1))
    return summary


FLITE_VOICES = ["kal16", "awb", "rms", "slt"]


def write_flite_tests():
    """The test splits spoken by another synthesizer, CMU Flite (Debian's `flite` package, not a
    pinned dependency): data/<task>/test-flite.jsonl and audio-flite/ (both git-ignored). A base
    that learned speech, not eSpeak NG's voices, should keep most of its score on them."""
    import shutil
    import subprocess
    import tempfile
    import torchaudio
    if shutil.which("flite") is None:
        sys.exit("flite not found: apt-get install flite (Debian/Ubuntu)")
    for task in ("ast", "sqa"):
        with open(DATA_DIR / task / "test.jsonl", encoding="utf-8") as f:
            lines = [json.loads(line) for line in f if line.strip()]
        (DATA_DIR / task / "audio-flite").mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            for index, line in enumerate(lines):
                voice = FLITE_VOICES[index % len(FLITE_VOICES)]
                raw = Path(tmp) / "clip.wav"
                subprocess.run(["flite", "-voice", voice, "-t", line["text"], "-o", str(raw)],
                               check=True)
                with wave.open(str(raw)) as w:
                    rate, pcm = w.getframerate(), w.readframes(w.getnframes())
                path = DATA_DIR / task / "audio-flite" / Path(line["audio"]).name
                line.update(audio=f"audio-flite/{path.name}", speaker=f"flite-{voice}",
                            duration=round(to_16k_wav(pcm, torchaudio.transforms.Resample(rate, SAMPLE_RATE), path), 3))
                line.pop("tts")
        write_jsonl(DATA_DIR / task / "test-flite.jsonl", lines)
        print(f"wrote {DATA_DIR / task / 'test-flite.jsonl'}: {len(lines)} clips")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synthesize", action="store_true",
                        help="only make the missing audio of the committed manifests")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: cores)")
    parser.add_argument("--flite", action="store_true",
                        help="only write the test splits spoken by CMU Flite (held-out check)")
    args = parser.parse_args()
    if args.flite:
        write_flite_tests()
    elif args.synthesize:
        made = synthesize_missing(toy_manifests(), args.workers)
        print(f"{made} clips synthesized")
    else:
        build_all(args.workers)


if __name__ == "__main__":
    main()
