-- Case-insensitive substring search on product names (GET /products?name=…) uses ILIKE '%…%', which a
-- B-tree cannot serve; a trigram GIN index can. pg_trgm itself is created by the migrator (database
-- wide, in schema public) before this file runs.
CREATE INDEX products_name_trgm ON products USING gin (product_name gin_trgm_ops);
