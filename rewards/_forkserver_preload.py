"""Imported once by the multiprocessing forkserver: every reward worker forked from it starts warm.

Importing this module has a side effect on purpose (importing math-verify and grading one example);
nothing else imports it.
"""

from rewards.worker import warm_up

warm_up()
