// The weir benchmark's job on Apache Flink: 1-minute event-time tumbling windows, count and sum
// of price per message key, 5 s bounded out-of-orderness, JSON results to a Kafka topic.
//
// Run as a local MiniCluster with parallelism 1 (bench/run.py starts it):
//   java <Flink's --add-opens/--add-exports> -cp classes:lib/* dev.weir.bench.WindowJob \
//     --bootstrap HOST:PORT --input TOPIC --output TOPIC --group ID \
//     --checkpoint-dir DIR --checkpoint-interval-ms MS
//
// Prints one line "WEIR_BENCH_FIRST_RECORD_MS=<epoch ms>" when the first record is decoded,
// which is where the benchmark starts its clock.
package dev.weir.bench;

import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.HashMap;
import java.util.Map;

import org.apache.flink.api.common.eventtime.WatermarkStrategy;
import org.apache.flink.api.common.functions.AggregateFunction;
import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.configuration.Configuration;
import org.apache.flink.connector.base.DeliveryGuarantee;
import org.apache.flink.connector.kafka.sink.KafkaRecordSerializationSchema;
import org.apache.flink.connector.kafka.sink.KafkaSink;
import org.apache.flink.connector.kafka.source.KafkaSource;
import org.apache.flink.connector.kafka.source.enumerator.initializer.OffsetsInitializer;
import org.apache.flink.connector.kafka.source.reader.deserializer.KafkaRecordDeserializationSchema;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.JsonNode;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.ObjectMapper;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.node.ObjectNode;
import org.apache.flink.streaming.api.environment.StreamExecutionEnvironment;
import org.apache.flink.streaming.api.functions.windowing.ProcessWindowFunction;
import org.apache.flink.streaming.api.windowing.assigners.TumblingEventTimeWindows;
import org.apache.flink.streaming.api.windowing.windows.TimeWindow;
import org.apache.flink.util.Collector;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.producer.ProducerRecord;

public final class WindowJob {

    /** One input event: the message key, the event time and the price. */
    public static final class Event {
        public String key;
        public long ts;
        public double price;

        public Event() {}
    }

    /** The running aggregate of one window. */
    public static final class Acc {
        public long count;
        public double sum;

        public Acc() {}
    }

    /** One closed window, as written to the output topic. */
    public static final class Result {
        public String key;
        public long start;
        public long end;
        public long count;
        public double sum;

        public Result() {}
    }

    /** Key from the Kafka message key, ts and price from the JSON value. */
    static final class EventDeserializer implements KafkaRecordDeserializationSchema<Event> {
        private static volatile boolean seenFirst = false;
        private transient ObjectMapper mapper;

        @Override
        public void deserialize(ConsumerRecord<byte[], byte[]> record, Collector<Event> out)
                throws java.io.IOException {
            if (!seenFirst) {
                seenFirst = true;
                System.out.println("WEIR_BENCH_FIRST_RECORD_MS=" + System.currentTimeMillis());
                System.out.flush();
            }
            if (mapper == null) {
                mapper = new ObjectMapper();
            }
            JsonNode node = mapper.readTree(record.value());
            Event e = new Event();
            e.key = new String(record.key(), StandardCharsets.UTF_8);
            e.ts = node.get("ts").asLong();
            e.price = node.get("price").asDouble();
            out.collect(e);
        }

        @Override
        public TypeInformation<Event> getProducedType() {
            return TypeInformation.of(Event.class);
        }
    }

    static final class CountSum implements AggregateFunction<Event, Acc, Acc> {
        @Override
        public Acc createAccumulator() {
            return new Acc();
        }

        @Override
        public Acc add(Event e, Acc acc) {
            acc.count += 1;
            acc.sum += e.price;
            return acc;
        }

        @Override
        public Acc getResult(Acc acc) {
            return acc;
        }

        @Override
        public Acc merge(Acc a, Acc b) {
            a.count += b.count;
            a.sum += b.sum;
            return a;
        }
    }

    static final class ToResult extends ProcessWindowFunction<Acc, Result, String, TimeWindow> {
        @Override
        public void process(String key, Context ctx, Iterable<Acc> accs, Collector<Result> out) {
            Acc acc = accs.iterator().next();
            Result r = new Result();
            r.key = key;
            r.start = ctx.window().getStart();
            r.end = ctx.window().getEnd();
            r.count = acc.count;
            r.sum = acc.sum;
            out.collect(r);
        }
    }

    /** Results keyed by the group key, valued as the JSON every runner of the benchmark writes. */
    static final class ResultSerializer implements KafkaRecordSerializationSchema<Result> {
        private final String topic;
        private transient ObjectMapper mapper;

        ResultSerializer(String topic) {
            this.topic = topic;
        }

        @Override
        public ProducerRecord<byte[], byte[]> serialize(Result r, KafkaSinkContext ctx, Long timestamp) {
            if (mapper == null) {
                mapper = new ObjectMapper();
            }
            ObjectNode node = mapper.createObjectNode();
            node.put("key", r.key);
            node.put("windowStartMs", r.start);
            node.put("windowEndMs", r.end);
            node.put("count", r.count);
            node.put("revenue", r.sum);
            try {
                return new ProducerRecord<>(
                        topic, r.key.getBytes(StandardCharsets.UTF_8), mapper.writeValueAsBytes(node));
            } catch (java.io.IOException e) {
                throw new RuntimeException(e);
            }
        }
    }

    private static Map<String, String> parse(String[] args) {
        Map<String, String> out = new HashMap<>();
        for (int i = 0; i + 1 < args.length; i += 2) {
            if (!args[i].startsWith("--")) {
                throw new IllegalArgumentException("expected --name value pairs, got " + args[i]);
            }
            out.put(args[i].substring(2), args[i + 1]);
        }
        for (String required : new String[] {"bootstrap", "input", "output", "group", "checkpoint-dir"}) {
            if (!out.containsKey(required)) {
                throw new IllegalArgumentException("missing --" + required);
            }
        }
        return out;
    }

    public static void main(String[] args) throws Exception {
        Map<String, String> a = parse(args);
        Configuration conf = new Configuration();
        conf.setString("parallelism.default", "1");
        // Offsets are committed and the sink flushed on each checkpoint, as weir and Quix commit
        // on their commit interval; at-least-once, like the weir run it is compared with.
        conf.setString("execution.checkpointing.interval", a.getOrDefault("checkpoint-interval-ms", "5000") + " ms");
        conf.setString("execution.checkpointing.mode", "AT_LEAST_ONCE");
        conf.setString("execution.checkpointing.storage", "filesystem");
        conf.setString("execution.checkpointing.dir", "file://" + a.get("checkpoint-dir"));
        StreamExecutionEnvironment env = StreamExecutionEnvironment.getExecutionEnvironment(conf);
        env.setParallelism(1);

        KafkaSource<Event> source = KafkaSource.<Event>builder()
                .setBootstrapServers(a.get("bootstrap"))
                .setTopics(a.get("input"))
                .setGroupId(a.get("group"))
                .setStartingOffsets(OffsetsInitializer.earliest())
                .setDeserializer(new EventDeserializer())
                .build();
        // Watermarks per Kafka partition (split), the operator's watermark the minimum of them.
        WatermarkStrategy<Event> watermarks = WatermarkStrategy
                .<Event>forBoundedOutOfOrderness(Duration.ofSeconds(5))
                .withTimestampAssigner((e, recordTs) -> e.ts);
        KafkaSink<Result> sink = KafkaSink.<Result>builder()
                .setBootstrapServers(a.get("bootstrap"))
                .setRecordSerializer(new ResultSerializer(a.get("output")))
                .setDeliveryGuarantee(DeliveryGuarantee.AT_LEAST_ONCE)
                .build();

        env.fromSource(source, watermarks, "events")
                .keyBy(e -> e.key)
                .window(TumblingEventTimeWindows.of(Duration.ofMinutes(1)))
                .aggregate(new CountSum(), new ToResult())
                .sinkTo(sink);
        env.execute("weir-bench-window-job");
    }
}
