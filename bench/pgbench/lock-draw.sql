SELECT pg_try_advisory_lock(42), nextval('distlock.token_seq');
SELECT pg_advisory_unlock(42);
