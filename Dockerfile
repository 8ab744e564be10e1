# The image of producer.py and consumer.py; docker-compose.yml gives each its command.
FROM python:3.11-slim
WORKDIR /app
# Requirements first, so a change to the code does not reinstall them.
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
# The daemons need no privilege: they run as a user of their own.
RUN useradd --system --no-create-home cdc
USER cdc
# Log lines reach `docker compose logs` as they are written.
ENV PYTHONUNBUFFERED=1
