"""General-domain English prose for pruning calibration (`lorakit.prune.general_calibration`).

LLM-Pruner draws its 10 calibration samples from BookCorpus (``LLMPruner/datasets/example_samples.py``,
``get_bookcorpus``), a hub download.  lorakit ships its own text instead, so pruning needs no network: the
paragraphs below were written for lorakit (no third-party text), in the register of narrative and expository
books, each long enough for a 64-token window under any common tokenizer.
"""

PARAGRAPHS: tuple[str, ...] = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps out of habit rather "
    "than need. There were one hundred and twelve of them, worn smooth in the middle by decades of boots. At the top "
    "he wiped the salt from the great lens, trimmed the wick, and waited for the first ships to show their lights on "
    "the horizon. Some nights the fog came in so thick that he could not see the rocks below, and he would sit by "
    "the window with a cup of tea, listening to the horn and thinking about the people out on the water.",
    "Bread is one of the oldest prepared foods. Archaeologists have found traces of flatbreads baked more than ten "
    "thousand years ago, long before farming spread across the world. The basic recipe has changed little: flour, "
    "water, salt, and often yeast. When yeast feeds on the sugars in the dough, it releases carbon dioxide, which "
    "is trapped by a network of gluten proteins. The bubbles expand in the heat of the oven, giving the loaf its "
    "light, open texture, while the crust browns as sugars and proteins react at the surface.",
    "Maria had never intended to become a teacher. She had studied chemistry because she liked the certainty of it, "
    "the way a reaction either happened or did not. But in her second year a professor asked her to help with an "
    "evening class for adults who had left school early, and she discovered that she loved the moment when a "
    "confused face suddenly cleared. By the end of the term she had changed her plans entirely, and she never "
    "once regretted it, even on the long winter afternoons when nobody seemed to be listening.",
    "A river shapes the land it flows through in ways that are easy to overlook. Over thousands of years, the water "
    "carries sand and silt from the mountains toward the sea, cutting valleys in some places and building plains in "
    "others. Where the current slows on the inside of a bend, sediment settles and the bank grows; where it speeds "
    "up on the outside, the bank is worn away. Slowly the bends become loops, and sometimes a loop is cut off "
    "entirely, leaving behind a quiet, curved lake far from the main channel.",
    "The train was already twenty minutes late when the announcement came that it would be delayed further. A "
    "groan went through the crowd on the platform. An old man sat down on his suitcase and opened a newspaper; two "
    "students began a card game on the bench; a woman in a green coat paced back and forth, checking her phone "
    "every few seconds. Nobody spoke to anyone else at first, but as the minutes stretched into an hour, small "
    "conversations began, and by the time the train finally arrived, half the platform seemed to know each other.",
    "Honeybees communicate the location of food with a remarkable movement known as the waggle dance. A returning "
    "forager walks in a straight line while shaking her body from side to side, then loops back and repeats. The "
    "angle of the straight run relative to vertical tells the other bees the direction of the flowers relative to "
    "the sun, and the length of the run tells them how far away the flowers are. Watching the dance in the dark "
    "hive, her sisters can fly directly to a patch of clover more than a mile away.",
    "When the storm finally passed, the village came out to survey the damage. Branches lay across the roads, a few "
    "roofs had lost their tiles, and the old oak by the church had split down the middle. Yet no one had been hurt, "
    "and by noon people were already working together, dragging limbs to the side of the lane and sharing tools. "
    "The baker handed out rolls from a basket, and the children, delighted by the change in routine, ran from "
    "house to house reporting every fallen fence as if it were a great adventure.",
    "Learning a musical instrument changes the way a person listens. At first a beginner hears only the melody, the "
    "tune that can be hummed. With practice, the ear starts to pick out the bass line underneath, the rhythm of the "
    "drums, the harmonies that fill the space between. A pianist learns to feel the weight of a chord before "
    "playing it, and a violinist learns to hear when a note is slightly sharp. These skills take years to develop, "
    "but once they are there, even a simple song on the radio sounds richer and more detailed.",
    "The map they had bought in the harbour town turned out to be wrong in almost every detail. The path that "
    "should have followed the coast wandered inland through thick forest, the bridge marked over the stream did not "
    "exist, and the village where they had planned to spend the night was nothing more than a ruined wall and a "
    "well. They laughed about it later, but at the time, tired and hungry and losing the light, they argued about "
    "whether to turn back or to press on and hope the next valley would be kinder.",
    "Glass is made by melting sand, soda, and lime together at very high temperatures. When the mixture cools, it "
    "does not form the orderly crystals that most solids do; instead its atoms are frozen in a disordered "
    "arrangement, more like a liquid that has stopped moving. This is why glass can be transparent and why it "
    "breaks in curved, shell-like fractures rather than along flat planes. Glassmakers have known how to shape it "
    "for thousands of years, blowing it into bottles, pressing it into panes, and spinning it into fine threads.",
    "Every morning the market square filled before the sun was properly up. Farmers arrived with carts of potatoes "
    "and cabbages, the fishmonger laid out his catch on beds of ice, and the woman who sold flowers arranged her "
    "buckets in a careful rainbow along the edge of the fountain. By eight o'clock the air was full of voices "
    "bargaining over prices, and the smell of coffee drifted from the small cafe on the corner, where the same "
    "four old men played dominoes at the same table, as they had done for as long as anyone could remember.",
    "Sleep is not simply a period of rest. During the night the brain cycles through several stages, each with its "
    "own pattern of electrical activity. In deep sleep, slow waves sweep across the cortex, and many researchers "
    "believe this is when memories from the day are consolidated. In the stage known for rapid eye movements, the "
    "brain becomes nearly as active as when awake, and most vivid dreams occur. A full night usually contains four "
    "or five of these cycles, and missing them has measurable effects on mood, attention, and learning.",
    "The letter arrived on a Tuesday, in an envelope so old that the stamp showed a king who had died before Thomas "
    "was born. It had been lost, the post office explained in a short note, behind a sorting machine for more than "
    "fifty years. The handwriting was his grandmother's, and it was addressed to a house the family had sold long "
    "ago. He sat at the kitchen table for a long time before opening it, turning it over in his hands and wondering "
    "what she could have wanted to say to someone in that house, all those years before.",
    "Mountains create their own weather. As moist air is pushed up the windward slope, it cools and the water vapour "
    "condenses into clouds, often producing heavy rain or snow. By the time the air crosses the summit and descends "
    "the other side, it has lost much of its moisture and warms as it sinks. This is why one side of a mountain "
    "range can be covered in green forest while the other is dry grassland or even desert, a pattern that geographers "
    "call a rain shadow and that can be seen on every continent.",
)
