// The Nexmark-style queries of the weir benchmark (bench/nexmark.py) on Apache Flink, in the same
// form as the weir jobs they are compared with:
//   q5  keyBy auction -> sliding 10 s / 2 s event-time windows -> count;
//       then keyBy the window's start -> one 2 s tumbling window per sliding window -> the
//       auction(s) with the most bids (the weir job's second, chained stage);
//   q7  keyBy auction -> 10 s tumbling windows -> highest bid; then keyBy the window's start ->
//       10 s tumbling window -> the highest of those (weir's two stages);
//   q11 keyBy bidder -> event-time session windows (10 s gap) -> count.
// Bounded out-of-orderness 5 s per Kafka partition, at-least-once KafkaSink, 5 s checkpoints,
// heap state, parallelism 1 (a local MiniCluster), as WindowJob.
//
//   java <Flink's --add-opens/--add-exports> -cp classes:lib/* dev.weir.bench.NexmarkJob \
//     --query q5|q7|q11 --bootstrap HOST:PORT --input TOPIC --output TOPIC --group ID \
//     --checkpoint-dir DIR [--checkpoint-interval-ms MS] [--rest-port PORT]
//
// Results are JSON in the shape of the weir jobs' results (bench/nexmark.py parse_result).
// Prints "WEIR_BENCH_FIRST_RECORD_MS=<epoch ms>" when the first record is decoded.
package dev.weir.bench;

import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Collections;
import java.util.HashMap;
import java.util.List;
import java.util.Map;

import org.apache.flink.api.common.eventtime.WatermarkStrategy;
import org.apache.flink.api.common.functions.AggregateFunction;
import org.apache.flink.api.common.functions.ReduceFunction;
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
import org.apache.flink.streaming.api.datastream.DataStream;
import org.apache.flink.streaming.api.environment.StreamExecutionEnvironment;
import org.apache.flink.streaming.api.functions.windowing.ProcessWindowFunction;
import org.apache.flink.streaming.api.windowing.assigners.EventTimeSessionWindows;
import org.apache.flink.streaming.api.windowing.assigners.SlidingEventTimeWindows;
import org.apache.flink.streaming.api.windowing.assigners.TumblingEventTimeWindows;
import org.apache.flink.streaming.api.windowing.windows.TimeWindow;
import org.apache.flink.util.Collector;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.producer.ProducerRecord;

public final class NexmarkJob {

    /** A Nexmark bid: the fields the queries read. */
    public static final class Bid {
        public long auction;
        public long bidder;
        public long price;
        public long dateTime;

        public Bid() {}
    }

    /** One window's answer for one key, between the two stages and to the sink. */
    public static final class Out {
        public String key;
        public long start;
        public long end;
        public long count;
        public List<Long> auctions; // q5: the hottest auctions
        public Bid best; // q7: the highest bid

        public Out() {}
    }

    static final class BidDeserializer implements KafkaRecordDeserializationSchema<Bid> {
        private static volatile boolean seenFirst = false;
        private transient ObjectMapper mapper;

        @Override
        public void deserialize(ConsumerRecord<byte[], byte[]> record, Collector<Bid> out)
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
            Bid b = new Bid();
            b.auction = node.get("auction").asLong();
            b.bidder = node.get("bidder").asLong();
            b.price = node.get("price").asLong();
            b.dateTime = node.get("dateTime").asLong();
            out.collect(b);
        }

        @Override
        public TypeInformation<Bid> getProducedType() {
            return TypeInformation.of(Bid.class);
        }
    }

    /** The highest price; ties to the lowest auction, bidder, then dateTime (as the weir functions). */
    static Bid higher(Bid a, Bid b) {
        if (a.price != b.price) {
            return a.price > b.price ? a : b;
        }
        if (a.auction != b.auction) {
            return a.auction < b.auction ? a : b;
        }
        if (a.bidder != b.bidder) {
            return a.bidder < b.bidder ? a : b;
        }
        return a.dateTime <= b.dateTime ? a : b;
    }

    static final class Count implements AggregateFunction<Bid, long[], Long> {
        @Override
        public long[] createAccumulator() {
            return new long[1];
        }

        @Override
        public long[] add(Bid b, long[] acc) {
            acc[0] += 1;
            return acc;
        }

        @Override
        public Long getResult(long[] acc) {
            return acc[0];
        }

        @Override
        public long[] merge(long[] a, long[] b) {
            a[0] += b[0];
            return a;
        }
    }

    /** Stage 1 of q5 and q11: the count of one key's window. */
    static final class CountResult extends ProcessWindowFunction<Long, Out, Long, TimeWindow> {
        @Override
        public void process(Long key, Context ctx, Iterable<Long> counts, Collector<Out> out) {
            Out o = new Out();
            o.key = Long.toString(key);
            o.start = ctx.window().getStart();
            o.end = ctx.window().getEnd();
            o.count = counts.iterator().next();
            out.collect(o);
        }
    }

    /** Stage 1 of q7: the highest bid of one auction's window. */
    static final class BestResult extends ProcessWindowFunction<Bid, Out, Long, TimeWindow> {
        @Override
        public void process(Long key, Context ctx, Iterable<Bid> bids, Collector<Out> out) {
            Out o = new Out();
            o.key = Long.toString(key);
            o.start = ctx.window().getStart();
            o.end = ctx.window().getEnd();
            o.best = bids.iterator().next();
            out.collect(o);
        }
    }

    /** Stage 2 of q5: the largest count among one sliding window's results, and its auctions. */
    static final class HotItems implements AggregateFunction<Out, Out, Out> {
        @Override
        public Out createAccumulator() {
            Out acc = new Out();
            acc.auctions = new ArrayList<>();
            return acc;
        }

        @Override
        public Out add(Out r, Out acc) {
            if (r.count > acc.count) {
                acc.count = r.count;
                acc.auctions.clear();
            }
            if (r.count == acc.count) {
                acc.auctions.add(Long.parseLong(r.key));
            }
            acc.key = Long.toString(r.start);
            acc.start = r.start;
            acc.end = r.end;
            return acc;
        }

        @Override
        public Out getResult(Out acc) {
            Collections.sort(acc.auctions);
            return acc;
        }

        @Override
        public Out merge(Out a, Out b) {
            if (a.count != b.count) {
                return a.count > b.count ? a : b;
            }
            a.auctions.addAll(b.auctions);
            return a;
        }
    }

    /** Stage 2 of q7: the highest of one window's per-auction highest bids. */
    static final class HighestOf implements ReduceFunction<Out> {
        @Override
        public Out reduce(Out a, Out b) {
            Out o = new Out();
            o.key = Long.toString(a.start);
            o.start = a.start;
            o.end = a.end;
            o.best = higher(a.best, b.best);
            return o;
        }
    }

    /** Stage 2 of q7: the window's answer, keyed by the first stage's window start. */
    static final class StartKeyed extends ProcessWindowFunction<Out, Out, Long, TimeWindow> {
        @Override
        public void process(Long start, Context ctx, Iterable<Out> outs, Collector<Out> out) {
            Out o = outs.iterator().next();
            o.key = Long.toString(start);
            out.collect(o);
        }
    }

    /** The JSON of the weir jobs' results: key, windowStartMs, windowEndMs and the query's answer. */
    static final class OutSerializer implements KafkaRecordSerializationSchema<Out> {
        private final String topic;
        private final String query;

        OutSerializer(String topic, String query) {
            this.topic = topic;
            this.query = query;
        }

        @Override
        public ProducerRecord<byte[], byte[]> serialize(Out o, KafkaSinkContext ctx, Long timestamp) {
            StringBuilder s = new StringBuilder(160);
            s.append("{\"key\":\"").append(o.key).append("\",\"windowStartMs\":").append(o.start)
                    .append(",\"windowEndMs\":").append(o.end);
            switch (query) {
                case "q5":
                    s.append(",\"hot\":{\"count\":").append(o.count).append(",\"auctions\":[");
                    for (int i = 0; i < o.auctions.size(); i++) {
                        s.append(i == 0 ? "" : ",").append(o.auctions.get(i));
                    }
                    s.append("]}");
                    break;
                case "q7":
                    s.append(",\"best\":[").append(o.best.price).append(',').append(o.best.auction).append(',')
                            .append(o.best.bidder).append(',').append(o.best.dateTime).append(']');
                    break;
                default:
                    s.append(",\"count\":").append(o.count);
            }
            s.append('}');
            return new ProducerRecord<>(topic, o.key.getBytes(StandardCharsets.UTF_8),
                    s.toString().getBytes(StandardCharsets.UTF_8));
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
        for (String required : new String[] {"query", "bootstrap", "input", "output", "group", "checkpoint-dir"}) {
            if (!out.containsKey(required)) {
                throw new IllegalArgumentException("missing --" + required);
            }
        }
        return out;
    }

    public static void main(String[] args) throws Exception {
        Map<String, String> a = parse(args);
        String query = a.get("query");
        Configuration conf = new Configuration();
        conf.setString("parallelism.default", "1");
        conf.setString("execution.checkpointing.interval", a.getOrDefault("checkpoint-interval-ms", "5000") + " ms");
        conf.setString("execution.checkpointing.mode", "AT_LEAST_ONCE");
        conf.setString("execution.checkpointing.storage", "filesystem");
        conf.setString("execution.checkpointing.dir", "file://" + a.get("checkpoint-dir"));
        if (a.containsKey("rest-port")) {
            conf.setString("rest.port", a.get("rest-port"));
            conf.setString("rest.bind-port", a.get("rest-port"));
        }
        StreamExecutionEnvironment env = StreamExecutionEnvironment.getExecutionEnvironment(conf);
        env.setParallelism(1);

        KafkaSource<Bid> source = KafkaSource.<Bid>builder()
                .setBootstrapServers(a.get("bootstrap"))
                .setTopics(a.get("input"))
                .setGroupId(a.get("group"))
                .setStartingOffsets(OffsetsInitializer.earliest())
                .setDeserializer(new BidDeserializer())
                .build();
        WatermarkStrategy<Bid> watermarks = WatermarkStrategy
                .<Bid>forBoundedOutOfOrderness(Duration.ofSeconds(5))
                .withTimestampAssigner((b, recordTs) -> b.dateTime);
        KafkaSink<Out> sink = KafkaSink.<Out>builder()
                .setBootstrapServers(a.get("bootstrap"))
                .setRecordSerializer(new OutSerializer(a.get("output"), query))
                .setDeliveryGuarantee(DeliveryGuarantee.AT_LEAST_ONCE)
                .build();

        DataStream<Bid> bids = env.fromSource(source, watermarks, "bids");
        DataStream<Out> out;
        switch (query) {
            case "q5":
                // Stage 1's results carry the timestamp end - 1, so a 2 s tumbling window keyed by
                // the start holds exactly the results of one sliding window.
                out = bids.keyBy(b -> b.auction)
                        .window(SlidingEventTimeWindows.of(Duration.ofSeconds(10), Duration.ofSeconds(2)))
                        .aggregate(new Count(), new CountResult())
                        .keyBy(o -> o.start)
                        .window(TumblingEventTimeWindows.of(Duration.ofSeconds(2)))
                        .aggregate(new HotItems());
                break;
            case "q7":
                out = bids.keyBy(b -> b.auction)
                        .window(TumblingEventTimeWindows.of(Duration.ofSeconds(10)))
                        .reduce(NexmarkJob::higher, new BestResult())
                        .keyBy(o -> o.start)
                        .window(TumblingEventTimeWindows.of(Duration.ofSeconds(10)))
                        .reduce(new HighestOf(), new StartKeyed());
                break;
            case "q11":
                out = bids.keyBy(b -> b.bidder)
                        .window(EventTimeSessionWindows.withGap(Duration.ofSeconds(10)))
                        .aggregate(new Count(), new CountResult());
                break;
            default:
                throw new IllegalArgumentException("unknown --query " + query);
        }
        out.sinkTo(sink);
        env.execute("weir-bench-nexmark-" + query);
    }
}
