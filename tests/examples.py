"""Small hand-made cases shared by the tests of the pure stage functions."""

from intgen.steps import split_steps

# A wrong attempt at "Tom has 3 apples and buys 4. He gives 2 away. How many?" (answer 5): step 2 adds wrong.
ATTEMPT = (
    "We need the total number of apples.\n\n"
    "Tom starts with 3 apples and buys 4 more, so 3 + 4 = 8.\n\n"
    "Then he gives away 2, leaving 8 - 2 = 6.\n\n"
    "So the answer is $\\boxed{6}$."
)
STEPS = split_steps(ATTEMPT)
