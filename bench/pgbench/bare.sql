SELECT pg_try_advisory_lock(42);
SELECT pg_advisory_unlock(42);
