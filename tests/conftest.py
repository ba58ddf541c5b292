"""Suite-wide scheduling: the longest modules start first.

`make test` runs `pytest -n 2 --dist loadscope --no-loadscope-reorder`: each module stays on one worker
(so module fixtures such as the SLURM cluster are made once) and modules are handed out in collection
order (xdist's default reorder, by number of tests, would start the one-test demo module last).
Starting the two longest ones (the quick demo, the SLURM chain) first keeps a worker from idling at
the end.
"""
LONGEST_FIRST = ["test_demo.py", "test_slurm.py", "test_parallel_parity.py", "test_train.py", "test_convert.py"]


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
