"""Fixed inputs for measuring a re-quantised model (local_models.compress): written for this project, so the tool
works without any downloaded data set. Changing them changes every figure: keep them as they are."""

from __future__ import annotations

# Plain expository English (about 2,500 characters, original text) for perplexity.
PERPLEXITY_TEXT = """\
Water moves through the world in a cycle that has no beginning and no end. Heat from the sun warms the surface \
of oceans, lakes and rivers, and some of that water turns into vapour and rises into the air. Plants add more \
vapour as they release water through small openings in their leaves. As the warm, moist air climbs, it expands \
and cools, and the vapour condenses into tiny droplets around specks of dust and salt. Billions of these \
droplets together form the clouds we see in the sky.

When the droplets in a cloud collide and join, they grow heavier. Once they are too heavy to stay aloft, they \
fall as rain, or as snow and hail when the air is cold enough. Some of this water soaks into the ground and \
refills the layers of rock and soil that hold groundwater. Some runs across the surface into streams, which \
join to form rivers that carry the water back to the sea. Snow that falls on high mountains may stay frozen for \
months or even centuries, stored in glaciers that slowly flow downhill and melt at their edges.

People depend on every part of this cycle. Farmers plan their planting around the seasons of rain, and cities \
build reservoirs to store water for dry months. Engineers measure the flow of rivers to decide where to place \
bridges and how high to build the banks that protect towns from floods. Because the total amount of water on \
the planet changes very little, the same water has been used again and again for millions of years.

A bridge must carry its own weight as well as the weight of the traffic that crosses it. The simplest kind is \
a beam bridge, a straight deck resting on supports at each end. When a load presses down on the middle of the \
beam, the top of the beam is squeezed while the bottom is stretched. Stone resists squeezing well but cracks \
when it is stretched, so early builders used arches instead. An arch turns the downward push of the load into \
a sideways push that travels along the curve into the ground, keeping every stone under compression.

Steel changed the way bridges were built because it resists both squeezing and stretching. With steel cables, \
engineers could hang a deck from tall towers, as in a suspension bridge, and cross much wider rivers and bays \
than before. The main cables pass over the towers and are anchored in heavy blocks of concrete on each shore. \
Vertical cables connect the main cables to the deck, so the weight of each car is shared across the whole \
structure. Wind is a special danger for long, light bridges, so modern designs are tested with models in wind \
tunnels before they are built.
"""

# Greedy decode speed is measured on this prompt.
SPEED_PROMPT = "Write a short paragraph about why the sky is blue."

# Short factual and arithmetic questions with the answers that count (none is a few-shot prompt example).
QA_SAMPLE: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of Italy?", ("Rome",)),
    ("What is the capital of Japan?", ("Tokyo",)),
    ("What is the capital of Spain?", ("Madrid",)),
    ("What is the capital of Germany?", ("Berlin",)),
    ("What is the capital of the United Kingdom?", ("London",)),
    ("What is the largest planet in the solar system?", ("Jupiter",)),
    ("Which planet is known as the Red Planet?", ("Mars",)),
    ("What is the chemical symbol for gold?", ("Au",)),
    ("What gas do plants absorb from the air to make food?", ("carbon dioxide", "CO2")),
    ("How many legs does a spider have?", ("8", "eight")),
    ("How many days are there in a week?", ("7", "seven")),
    ("How many continents are there on Earth?", ("7", "seven")),
    ("What is the freezing point of water in degrees Celsius?", ("0", "zero")),
    ("Who painted the Mona Lisa?", ("Leonardo da Vinci", "da Vinci", "Leonardo")),
    ("Who developed the theory of relativity?", ("Albert Einstein", "Einstein")),
    ("What is the largest ocean on Earth?", ("Pacific", "Pacific Ocean")),
    ("What is the longest river in South America?", ("Amazon", "Amazon River")),
    ("In which country are the pyramids of Giza?", ("Egypt",)),
    ("What language is mainly spoken in Brazil?", ("Portuguese",)),
    ("What is the opposite of hot?", ("cold",)),
    ("What color do you get by mixing blue and yellow?", ("green",)),
    ("What is 2 + 3?", ("5", "five")),
    ("What is 9 - 4?", ("5", "five")),
    ("What is 6 times 7?", ("42", "forty-two", "forty two")),
    ("What is 10 + 15?", ("25", "twenty-five", "twenty five")),
    ("What is 100 divided by 4?", ("25", "twenty-five", "twenty five")),
    ("What is 8 times 8?", ("64", "sixty-four", "sixty four")),
    ("Tom has 5 pens and gives away 2. How many pens does he have left?", ("3", "three")),
    ("A car has 4 wheels. How many wheels do 3 cars have?", ("12", "twelve")),
    ("Anna reads 10 pages a day. How many pages does she read in 3 days?", ("30", "thirty")),
)
