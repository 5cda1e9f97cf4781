-- The exact search path multiplied REAL components as REAL: a product below REAL's smallest value (two
-- components near 1e-20, which real model outputs have) is an error in PostgreSQL, not zero, so one such
-- vector failed every search of its tenant. Products and sums are taken in double precision.
CREATE OR REPLACE FUNCTION activekg_cosine(a REAL[], b REAL[]) RETURNS DOUBLE PRECISION
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT sum(x::float8 * y::float8) / nullif(sqrt(sum(x::float8 * x::float8)) * sqrt(sum(y::float8 * y::float8)), 0)
    FROM unnest(a, b) AS t(x, y)
$$;
