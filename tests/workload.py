"""Concurrent writers for the source: overlapping transactions held open at random,
some rolled back, inserting, updating and deleting on a shared range of emp_ids."""

import random
import threading
import time

import psycopg2

from conftest import connect


class Writers:
    def __init__(self, threads=8, keys=200, seed=1, max_transactions=None):
        self.keys = keys
        self.seed = seed
        self.max_transactions = max_transactions
        self.stopping = threading.Event()
        self.committed = 0
        self.rolled_back = 0
        self.interrupted = 0  # transactions cut by the loss of the source
        self.errors = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._write, args=(number,), daemon=True)
                         for number in range(threads)]

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stop()

    def stop(self):
        self.stopping.set()
        for thread in self._threads:
            thread.join(60)
        assert not self.errors, self.errors[:3]

    def wait(self, timeout=120):
        """Until every thread did its max_transactions."""
        for thread in self._threads:
            thread.join(timeout)

    def _write(self, number):
        rng = random.Random(self.seed * 1000 + number)
        db = None
        done = 0
        try:
            while not self.stopping.is_set() and (self.max_transactions is None or done < self.max_transactions):
                if db is None:
                    db = self._connect()
                    continue
                done += 1
                try:
                    with db.cursor() as cursor:
                        # Keys in ascending order: overlapping transactions wait, not deadlock.
                        for emp_id in sorted(rng.sample(range(1, self.keys + 1), rng.randint(1, 3))):
                            self._change(cursor, rng, emp_id)
                            time.sleep(rng.random() * 0.005)
                    if rng.random() < 0.1:
                        db.rollback()
                        self._count("rolled_back")
                    else:
                        db.commit()
                        self._count("committed")
                except psycopg2.errors.SerializationFailure:
                    db.rollback()
                except (psycopg2.OperationalError, psycopg2.InterfaceError):
                    # The source went away (a test stops it): whether this transaction
                    # committed is the source's to say; the tests compare with it.
                    db.close()
                    db = None
                    self._count("interrupted")
        except Exception as error:  # reported by stop(), so that the test fails on it
            self.errors.append(repr(error))
        finally:
            if db is not None:
                db.close()

    def _connect(self):
        """A connection to the source, or None (after a short wait) while it is down."""
        try:
            db = connect("source")
        except psycopg2.OperationalError:
            time.sleep(0.2)
            return None
        db.autocommit = False
        return db

    @staticmethod
    def _change(cursor, rng, emp_id):
        kind = rng.random()
        if kind < 0.45:
            cursor.execute(
                "INSERT INTO employees (emp_id, first_name, last_name, dob, city, salary) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (emp_id) DO UPDATE "
                "SET salary = excluded.salary, city = excluded.city",
                (emp_id, f"First{emp_id}", f"Last{rng.randint(1, 99)}",
                 f"19{rng.randint(50, 99)}-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}",
                 rng.choice(["Oslo", "Lima", "Kyiv", None]), rng.randint(30000, 150000)))
        elif kind < 0.8:
            cursor.execute("UPDATE employees SET salary = salary + %s, city = %s WHERE emp_id = %s",
                           (rng.randint(1, 500), rng.choice(["Rome", "Pune", "Baku"]), emp_id))
        else:
            cursor.execute("DELETE FROM employees WHERE emp_id = %s", (emp_id,))

    def _count(self, what):
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)
