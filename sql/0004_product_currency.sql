-- ProductCreated schema version 2 names the price's currency; every earlier price was in euros.
ALTER TABLE products ADD COLUMN product_currency text NOT NULL DEFAULT 'EUR';
