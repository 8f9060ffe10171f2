-- Search mode in the web app: the sources an answer cites (a JSON array of
-- {n, kb, title, source, published, text}), kept with the message.
ALTER TABLE messages ADD COLUMN sources TEXT;
