-- Tools in the web app: the steps the server ran for an answer (a JSON
-- array of {step, id, name, arguments, ok, content, ms}), kept with it.
ALTER TABLE messages ADD COLUMN tools TEXT;
