"""egm.reasoning: the part of one reasoning text that belongs to one label."""

from __future__ import annotations

from hypothesis import given, settings as hsettings, strategies as st

from egm.reasoning import in_label_blocks, reasoning_for_label

SHAPES = ["green square", "red circle", "square"]
MULTI = ("The image shows shapes on a white background. The green square is in the top left. It is small. "
         "Two red circles sit near the bottom. They overlap slightly. A square outline spans 0.5 of the width.")


def test_multi_category_text_is_cut_into_each_labels_sentences():
    assert reasoning_for_label(MULTI, "green square", SHAPES) == "The green square is in the top left. It is small."
    assert reasoning_for_label(MULTI, "red circle", SHAPES) == ("Two red circles sit near the bottom. "
                                                                 "They overlap slightly.")
    # "square" inside "green square" is the longer label's; "0.5" does not end a sentence
    assert reasoning_for_label(MULTI, "square", SHAPES) == "A square outline spans 0.5 of the width."


def test_a_label_the_text_never_names_gets_nothing():
    assert reasoning_for_label(MULTI, "blue triangle", SHAPES + ["blue triangle"]) == ""
    assert reasoning_for_label("Everything is on the left.", "Person", ["Person", "Car"]) == ""


def test_names_match_case_plurals_and_separators():
    labels = ["traffic_light", "Bus", "box"]
    text = "Two Traffic Lights hang above.\nA bus waits. Boxes are stacked. The busy street is wide."
    assert reasoning_for_label(text, "traffic_light", labels) == "Two Traffic Lights hang above."
    assert reasoning_for_label(text, "Bus", labels) == "A bus waits."  # "busy" is not "bus"
    assert reasoning_for_label(text, "box", labels) == "Boxes are stacked. The busy street is wide."


def test_a_sentence_naming_two_labels_belongs_to_both():
    text = "The green square is left of the red circle. Nothing else."
    assert reasoning_for_label(text, "green square", SHAPES) == text
    assert reasoning_for_label(text, "red circle", SHAPES) == text


def test_per_label_blocks_of_the_worker():
    joined = "Person: a man in red\nhe waves\nVehicle: a blue car"
    labels = ["Person", "Vehicle", "Animal"]
    assert in_label_blocks(joined, labels)
    assert reasoning_for_label(joined, "Person", labels) == "a man in red\nhe waves"
    assert reasoning_for_label(joined, "Vehicle", labels) == "a blue car"
    assert reasoning_for_label(joined, "Animal", labels) == ""
    # longest prefix first: "Red car: ..." is not the block of "Red"
    assert reasoning_for_label("Red car: shiny\nRed: a wall", "Red", ["Red", "Red car"]) == "a wall"


def test_one_label_gets_the_whole_text():
    assert reasoning_for_label("one shared text", "Person", ["Person"]) == "one shared text"
    assert reasoning_for_label("  It is at the top.  ", "Person", []) == "It is at the top."
    assert not in_label_blocks("one shared text", ["Person"])


def test_empty_inputs():
    assert reasoning_for_label("", "Person", ["Person"]) == ""
    assert reasoning_for_label("text", "", ["Person"]) == ""


words = st.sampled_from(["the", "green", "square", "red", "circle", "is", "left", "It", "and", "0.5", "two"])
sentences = st.lists(words, min_size=1, max_size=8).map(lambda ws: " ".join(ws) + ".")


@hsettings(max_examples=200, deadline=None)
@given(parts=st.lists(sentences, max_size=6), label=st.sampled_from(SHAPES))
def test_what_is_kept_is_whole_sentences_of_the_text_in_order(parts, label):
    text = " ".join(parts)
    kept = reasoning_for_label(text, label, SHAPES)
    pieces = [p for p in kept.split(". ") if p]
    position = 0
    for piece in pieces:  # every kept piece appears in the text, in order
        position = text.index(piece.rstrip("."), position)
    assert len(kept) <= len(text)


def test_aliases_count_as_mentions_of_their_label():
    text = "A red car is parked. A man waves. Its door is open."
    labels = ["Person", "Vehicle"]
    aliases = {"car": "Vehicle", "man": "Person", "person": "Person", "vehicle": "Vehicle"}
    assert reasoning_for_label(text, "Vehicle", labels, aliases) == "A red car is parked."
    assert reasoning_for_label(text, "Person", labels, aliases) == "A man waves. Its door is open."
    assert reasoning_for_label(text, "Vehicle", labels) == ""  # without aliases "car" names no label
    # an alias of a label outside the prompt's labels is no mention
    assert reasoning_for_label(text, "Person", labels, {"car": "Truck"}) == ""
