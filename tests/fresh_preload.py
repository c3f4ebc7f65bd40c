"""Imported first by every process a test may kill with SIGKILL: the children of helpers.Fresh and the Dask
workers of test_sweep (a worker preload). tqdm's write lock becomes a thread lock: its default, a
multiprocessing semaphore, is registered with the resource tracker these processes share with the test run,
and a killed process could never release it (a "leaked semaphore" warning at the end of the run)."""
import threading

from tqdm import tqdm

tqdm.set_lock(threading.RLock())
