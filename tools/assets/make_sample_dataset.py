#!/usr/bin/env python3
"""Writes the bundled ScienceQA-style sample set: assets/scienceqa-sample/{train,validation,test}.parquet
in the Hugging Face layout of derek-thomas/ScienceQA (image struct{bytes, path} or null, question,
choices list<string>, answer int8, hint, task, grade, subject, topic, category, skill, lecture,
solution), plus assets/sample_diagram.png. Questions and pictures are our own: bar charts, food webs,
maps with a compass rose, thermometers, magnets and circuits drawn here with Pillow; some rows have
no image; 2 to 5 choices. Deterministic (seeded).

  python3 tools/assets/make_sample_dataset.py          # needs pillow and pyarrow
"""
import io
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

OUT = "assets/scienceqa-sample"
R = random.Random(20261127)


def png(img):
    b = io.BytesIO()
    img.save(b, format="PNG")
    return b.getvalue()


def canvas(w, h, mode="RGB"):
    img = Image.new(mode, (w, h), "white" if mode == "RGB" else 255)
    return img, ImageDraw.Draw(img)


def bar_chart(values, labels):
    img, d = canvas(320, 220)
    d.line([(30, 190), (310, 190)], fill="black", width=2)
    d.line([(30, 20), (30, 190)], fill="black", width=2)
    w = 260 // len(values)
    colors = ["#d95f02", "#1b9e77", "#7570b3", "#e7298a", "#66a61e"]
    for i, (v, lab) in enumerate(zip(values, labels)):
        x = 40 + i * w
        d.rectangle([x, 190 - v * 16, x + w - 14, 190], fill=colors[i % 5], outline="black")
        d.text((x + 2, 195), lab, fill="black")
    return img


def food_web(names):
    img, d = canvas(380, 180)
    d.text((10, 10), "Food chain (arrows point to the eater)", fill="black")
    pos = [(20 + i * 125, 90) for i in range(len(names))]
    for (x, y), n in zip(pos, names):
        d.ellipse([x - 8, y - 12, x + 78, y + 26], fill="#eaf6e4", outline="darkgreen", width=2)
        d.text((x + 4, y + 2), n, fill="black")
    for a, b in zip(pos[:-1], pos[1:]):
        y = a[1] + 7
        d.line([(a[0] + 78, y), (b[0] - 14, y)], fill="brown", width=3)
        d.polygon([(b[0] - 8, y), (b[0] - 18, y - 7), (b[0] - 18, y + 7)], fill="brown")
    return img


def compass_map(marked):
    img, d = canvas(300, 300)
    d.rectangle([20, 20, 220, 280], outline="black", fill="#e8f4e0")
    spots = {"north": (120, 40), "south": (120, 260), "east": (200, 150), "west": (40, 150)}
    for name, (x, y) in spots.items():
        d.ellipse([x - 10, y - 10, x + 10, y + 10], fill="red" if name == marked else "gray")
    cx, cy = 260, 60
    d.line([(cx, cy - 30), (cx, cy + 30)], fill="black", width=2)
    d.line([(cx - 30, cy), (cx + 30, cy)], fill="black", width=2)
    for t, (x, y) in {"N": (cx - 4, cy - 45), "S": (cx - 4, cy + 33), "E": (cx + 33, cy - 6), "W": (cx - 45, cy - 6)}.items():
        d.text((x, y), t, fill="black")
    return img


def thermometers(temps):
    img, d = canvas(100 * len(temps) + 40, 260)
    for i, t in enumerate(temps):
        x = 50 + i * 100
        d.rectangle([x, 30, x + 20, 210], outline="black")
        top = 210 - int(t * 1.6)
        d.rectangle([x + 4, top, x + 16, 210], fill="red")
        d.ellipse([x - 6, 200, x + 26, 232], fill="red", outline="black")
        d.text((x - 4, 238), f"{t} C", fill="black")
    return img


def magnets(attract):
    img, d = canvas(360, 120)
    left = ["N", "S"]
    right = ["S", "N"] if attract else ["N", "S"]
    for i, (a, b) in enumerate([left, right]):
        x = 20 + i * 190
        d.rectangle([x, 40, x + 70, 80], fill="#ff9999", outline="black")
        d.rectangle([x + 70, 40, x + 140, 80], fill="#9999ff", outline="black")
        d.text((x + 30, 55), a, fill="black")
        d.text((x + 100, 55), b, fill="black")
    return img


def circuit(closed):
    img, d = canvas(280, 200)
    d.rectangle([40, 40, 240, 160], outline="black", width=3)
    d.rectangle([30, 80, 50, 120], fill="gray")  # battery
    d.ellipse([220, 80, 260, 120], fill="yellow" if closed else "white", outline="black", width=2)  # bulb
    if not closed:
        d.rectangle([120, 35, 160, 45], fill="white")  # gap in the wire
        d.line([(120, 40), (155, 20)], fill="black", width=3)
    return img


def rows():
    out = []
    letters = "ABCDE"

    def add(question, choices, answer, *, image=None, hint="", subject="natural science", grade="grade4", topic="science",
            category="Observation", skill="Read a diagram", lecture="", solution="", task="closed choice"):
        assert 2 <= len(choices) <= 5 and 0 <= answer < len(choices)
        out.append(dict(image=None if image is None else {"bytes": png(image), "path": None}, question=question,
                        choices=choices, answer=answer, hint=hint, task=task, grade=grade, subject=subject, topic=topic,
                        category=category, skill=skill, lecture=lecture, solution=solution))

    animals = ["cats", "dogs", "fish", "birds", "frogs"]
    for k in range(8):
        n = R.randint(3, 5)
        labs = R.sample(animals, n)
        vals = R.sample(range(2, 10), n)
        best = max(range(n), key=lambda i: vals[i])
        add("Which pet is the most common in the class survey?", labs, best, image=bar_chart(vals, labs),
            hint="The bar chart shows how many students own each kind of pet.", topic="units-and-measurement",
            category="Data and graphs", skill="Read a bar graph", grade=f"grade{R.randint(2, 5)}",
            lecture="A bar graph compares amounts. The taller the bar, the larger the amount.",
            solution=f"The tallest bar is the one for {labs[best]}, with {vals[best]} students.")
    chains = [["grass", "rabbit", "fox"], ["algae", "snail", "duck"], ["seeds", "mouse", "owl"],
              ["leaves", "caterpillar", "bird"], ["plankton", "krill", "whale"], ["clover", "deer", "wolf"]]
    for chain in chains:
        q = R.choice(["producer", "top consumer"])
        ans = chain[0] if q == "producer" else chain[-1]
        choices = chain[:]
        R.shuffle(choices)
        add(f"Which organism is the {q} in this food chain?", choices, choices.index(ans), image=food_web(chain),
            hint="Arrows point from the food to the animal that eats it.", topic="biology", category="Ecological interactions",
            skill="Interpret food webs", grade=f"grade{R.randint(5, 8)}",
            lecture="Producers make their own food from sunlight. Consumers eat other organisms; "
                    "the top consumer is not eaten by any other organism in the chain.",
            solution=f"The {ans} is the {q}: " + ("no arrow points to it." if q == "producer" else "no arrow leaves it."))
    for side in ["north", "south", "east", "west", "north", "east"]:
        choices = ["north", "south", "east", "west"]
        add("Which side of the park is the red dot on?", choices, choices.index(side), image=compass_map(side),
            subject="social science", topic="geography", category="Geography", skill="Read a map: cardinal directions",
            grade=f"grade{R.randint(2, 4)}", lecture="A compass rose shows the directions north, south, east and west.",
            solution=f"The red dot is toward the {side} of the map.")
    for k in range(6):
        temps = R.sample(range(5, 95, 5), 2)
        hotter = 0 if temps[0] > temps[1] else 1
        add("Which beaker of water is hotter?", ["the left beaker", "the right beaker"], hotter, image=thermometers(temps),
            hint="Each thermometer shows the temperature of one beaker.", topic="physics", category="Heat and thermal energy",
            skill="Compare temperatures", grade=f"grade{R.randint(3, 6)}", task="yes or no" if k % 2 else "closed choice",
            lecture="Temperature measures how hot or cold something is. A higher reading means hotter.",
            solution=f"The {'left' if hotter == 0 else 'right'} thermometer reads {max(temps)} C, the higher temperature.")
    for attract in [True, False, True, False, True]:
        add("Will these magnets attract or repel each other?", ["attract", "repel"], 0 if attract else 1,
            image=magnets(attract), hint="Look at the poles that face each other.", topic="physics", category="Magnets",
            skill="Predict magnetic forces", grade="grade3",
            lecture="Opposite poles attract and like poles repel.",
            solution="The facing poles are " + ("opposite, so the magnets attract." if attract else "the same, so the magnets repel."))
    for closed in [True, False, False, True]:
        add("Will the light bulb glow?", ["yes", "no"], 0 if closed else 1, image=circuit(closed), topic="physics",
            category="Electricity", skill="Identify complete circuits", grade="grade5", task="yes or no",
            lecture="Electric current flows only around a closed loop from the battery and back.",
            solution="The circuit is " + ("closed, so current flows and the bulb glows." if closed else "open, so no current flows."))
    grammar = [("Which word is a noun?", ["run", "happy", "river", "quickly"], 2, "A noun names a person, place or thing."),
               ("Which word is a verb?", ["jump", "green", "table"], 0, "A verb tells what someone or something does."),
               ("Which word is an adjective?", ["slowly", "bright", "sing", "chair", "under"], 1, "An adjective describes a noun."),
               ("Which sentence is a question?", ["The dog barks.", "Where is my hat?"], 1, "A question asks something and ends with a question mark."),
               ("Which word rhymes with cat?", ["hat", "cup", "dog"], 0, "Rhyming words end with the same sound."),
               ("Which word is spelled correctly?", ["freind", "friend", "frend"], 1, "Remember: i before e except after c.")]
    for q, c, a, lec in grammar:
        add(q, c, a, subject="language science", topic="grammar", category="Parts of speech", skill="Identify word types",
            grade=f"grade{R.randint(1, 4)}", lecture=lec, solution=f"The answer is {c[a]}.")
    facts = [("Which of these is a renewable resource?", ["coal", "sunlight", "oil"], 1, "natural science", "earth-science",
              "Renewable resources are replaced by nature in a short time.", "Sunlight keeps arriving every day.", "grade6"),
             ("Which is a state of matter?", ["gas", "heat", "light"], 0, "natural science", "chemistry",
              "Matter can be a solid, a liquid or a gas.", "A gas is a state of matter.", "grade3"),
             ("Which branch of government makes laws in the United States?", ["the executive", "the legislative", "the judicial"],
              1, "social science", "civics", "Congress is the legislative branch.", "Congress, the legislative branch, makes laws.", "grade8"),
             ("What is the boiling point of water at sea level?", ["50 C", "100 C", "150 C", "0 C"], 1, "natural science",
              "physics", "Water boils at 100 degrees Celsius at sea level.", "It boils at 100 C.", "grade7"),
             ("Which planet is closest to the Sun?", ["Mars", "Venus", "Mercury", "Earth"], 2, "natural science", "earth-science",
              "The planets in order from the Sun begin Mercury, Venus, Earth, Mars.", "Mercury is the closest.", "grade4"),
             ("Which unit would you use to measure the length of a pencil?", ["centimeters", "kilometers", "liters"], 0,
              "natural science", "units-and-measurement", "Small lengths are measured in centimeters.",
              "A pencil is about 15 centimeters long.", "grade2"),
             ("Which economic term names what people give up when they make a choice?", ["opportunity cost", "profit"], 0,
              "social science", "economics", "The opportunity cost is the value of the next best option.",
              "Giving up the next best option is the opportunity cost.", "grade9"),
             ("Which organ pumps blood through the body?", ["lungs", "heart", "stomach", "brain", "liver"], 1, "natural science",
              "biology", "The heart is a muscle that pumps blood.", "The heart pumps blood.", "grade5"),
             ("Which force pulls objects toward Earth?", ["magnetism", "friction", "gravity"], 2, "natural science", "physics",
              "Gravity pulls objects with mass toward each other.", "Gravity pulls objects toward Earth.", "grade6"),
             ("Which ocean is the largest?", ["Atlantic", "Indian", "Pacific", "Arctic"], 2, "social science", "geography",
              "The Pacific Ocean is the largest and deepest ocean.", "The Pacific is the largest.", "grade10"),
             ("Which is a simple machine?", ["lever", "battery", "magnet"], 0, "natural science", "physics",
              "Simple machines include the lever, pulley, wedge, screw, wheel and axle, and inclined plane.",
              "A lever is a simple machine.", "grade11"),
             ("Which gas do plants take in from the air?", ["oxygen", "carbon dioxide", "nitrogen"], 1, "natural science",
              "biology", "Plants use carbon dioxide, water and sunlight to make sugar.", "Plants take in carbon dioxide.", "grade12")]
    for q, c, a, subj, topic, lec, sol, grade in facts:
        add(q, c, a, subject=subj, topic=topic, category="Knowledge", skill="Recall facts", grade=grade, lecture=lec,
            solution=sol, hint=R.choice(["", "", "Think about what you learned in class."]))
    return out


def write(rows, path):
    schema = pa.schema([
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ("question", pa.string()), ("choices", pa.list_(pa.string())), ("answer", pa.int8()), ("hint", pa.string()),
        ("task", pa.string()), ("grade", pa.string()), ("subject", pa.string()), ("topic", pa.string()),
        ("category", pa.string()), ("skill", pa.string()), ("lecture", pa.string()), ("solution", pa.string()),
    ])
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path, compression="snappy")


def main():
    os.makedirs(OUT, exist_ok=True)
    all_rows = rows()
    R.shuffle(all_rows)
    n = len(all_rows)
    test, val = all_rows[:12], all_rows[12:24]
    train = all_rows[24:]
    for name, part in [("train", train), ("validation", val), ("test", test)]:
        write(part, os.path.join(OUT, f"{name}.parquet"))
        print(f"{name}: {len(part)} rows, {sum(r['image'] is not None for r in part)} with an image")
    food_web(["grass", "rabbit", "fox"]).save("assets/sample_diagram.png")
    print(f"{n} rows; wrote assets/sample_diagram.png")


if __name__ == "__main__":
    main()
